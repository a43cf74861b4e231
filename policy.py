"""The policy: tokenizer, image-only Qwen3-VL processor, tiny model builders, checkpoint loading.

Real runs load a Qwen3-VL checkpoint (`load_policy("path/to/Qwen3-VL-4B")`). Tests and the toy world
build a tiny Qwen3-VL from scratch (`build_tokenizer` -> `build_processor` -> `build_policy`), save
it with `save_policy` and reload it through `load_policy`, i.e. the same path as a real checkpoint.

torchvision is not available (its CPU wheels do not match torch 2.13), and the stock
Qwen3VLProcessor refuses to build without it because of its video processor. The image-only
subclass below drops the video processor and keeps the PIL image processor.
"""
import math
import os
import socket
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                          PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

from maestro import NEUTRAL_LT, PROTOCOL_TAGS, system_prompt, user_prompt

VISION_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# The pre-tokenizer split of Qwen2/Qwen3 (letters, single digits, punctuation runs, newlines, spaces).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen-style chat template. Content is a string or a list of parts {"type": "image"} / {"type": "text"}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Named sizes of the from-scratch policy: "tiny" ~0.3M parameters for tests, "toy" ~0.4M for the
# toy-world main job (the width a text-only probe of the toy world measured), "small" ~2.5M for benches.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2),
    "toy": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vision_hidden=32, vision_depth=2),
    "small": dict(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=640, vision_hidden=64, vision_depth=2),
}
HEAD_DIM = 32
MROPE_SECTION = [6, 5, 5]   # must sum to HEAD_DIM / 2 (not validated by transformers)
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 16, 2, 2


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor, so it builds and reloads without torchvision.

    ProcessorMixin derives the sub-processors from this __init__ signature: image_processor + tokenizer.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        for key, default in VISION_TOKENS.items():
            token = getattr(tokenizer, key, None) or default
            setattr(self, key, token)
            setattr(self, key + "_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def suppressed_ids(processor):
    """Ids of the vision tokens: never sampled, -inf in the log-probs of rollout and training alike."""
    tokenizer = tokenizer_of(processor)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS.values()]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def vision_tokens_as_text(text):
    """`text` with each vision token it spells (<|image_pad|>, ...) made plain text, as neutralize_tags
    does for tags: upstream's loop puts expert replies and re-encoded turns into the context raw, and
    a real vision id there would be an image the training forward has no pixels for."""
    for token in VISION_TOKENS.values():
        text = text.replace(token, NEUTRAL_LT + token[1:])
    return text


def observation_glue(processor):
    """(before, after): the chat-template text around a user turn that follows an assistant turn."""
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    reply, observation = "\u27e6reply\u27e7", "\u27e6observation\u27e7"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": observation}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
    start, end = text.index(reply) + len(reply), text.index(observation)
    return text[start:end], text[end + len(observation):]


def build_tokenizer(corpus, vocab_size=1000, extra_tokens=(), split_digits=True):
    """Byte-level BPE trained on `corpus` (never produces UNK), with Qwen's special tokens.

    split_digits: one token per digit, as Qwen's tokenizer does; False lets BPE learn whole numbers
    (with their leading space), so a number the policy copies is one token rather than two to four.

    <|endoftext|> is the pad token (id 0), <|im_end|> the end-of-turn / eos token. The protocol tags
    (maestro.PROTOCOL_TAGS) and `extra_tokens` (expert and skill names, the call separator, ...) are
    added as atomic, non-special tokens so they survive decode(skip_special_tokens=True).
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX if split_digits else
                                   PRETOKENIZE_REGEX.replace(r"|\p{N}|", r"| ?\p{N}+|")), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left",  # must be a constructor argument: setting it afterwards is not saved
        extra_special_tokens=dict(VISION_TOKENS))
    tokenizer.add_tokens(list(dict.fromkeys([*PROTOCOL_TAGS, *extra_tokens])))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, shortest_edge=32 * 32, longest_edge=128 * 128):
    """Image-only Qwen3-VL processor around `tokenizer`. The edges are pixel counts (min/max area):
    the defaults give 4..16 visual tokens per image, which keeps CPU tests fast."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)


def tokenizer_of(processor):
    """The tokenizer inside a processor, or the processor itself when the policy is text-only."""
    return getattr(processor, "tokenizer", processor)


def is_vision_processor(processor):
    return getattr(processor, "image_processor", None) is not None


def build_policy(processor, size="tiny", seed=0):
    """A randomly initialised Qwen3-VL (or Qwen3ForCausalLM when `processor` is a plain tokenizer).

    Sizes: "tiny" (~0.3M params with a 1000-token vocabulary), "small" (~2.5M).
    """
    if size not in SIZES:
        raise ValueError(f"unknown policy size {size!r}: expected one of {sorted(SIZES)}")
    s = SIZES[size]
    tokenizer = tokenizer_of(processor)
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=HEAD_DIM, max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if is_vision_processor(processor):
        text_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": MROPE_SECTION, "mrope_interleaved": True}
        vision_config = dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
            num_heads=2, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            out_hidden_size=s["hidden"],  # must equal the text hidden size
            num_position_embeddings=64, deepstack_visual_indexes=list(range(s["vision_depth"])))
        model_class, config = Qwen3VLForConditionalGeneration, Qwen3VLConfig(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=True,
            image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
            vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
    else:
        model_class, config = Qwen3ForCausalLM, Qwen3Config(**text_config, rope_theta=5e6)
    # The weights follow `seed` alone and the caller's random streams stay its own (every rank seeds
    # its own sampling): the CPU generator only, as torch.manual_seed would reseed every GPU too.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return model_class(config).eval()


def save_policy(model, processor, out_dir):
    """Write safetensors weights, config and the processor (or tokenizer) to `out_dir`."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _hub_reachable(timeout=3.0):
    """Without HF_HUB_OFFLINE a missing network costs ~23 s of hub retries per file; probe once first."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_policy(path_or_id, dtype=torch.float32, device="cpu"):
    """Load (model, processor) from a local checkpoint directory or a Hub id.

    Vision-language configs load with AutoModelForImageTextToText and the image-only processor;
    text-only configs with AutoModelForCausalLM and AutoTokenizer. The model is in eval mode, in
    `dtype`, on `device`.
    """
    local = Path(path_or_id).is_dir()
    if not local and (Path(path_or_id).is_absolute() or str(path_or_id).startswith(".")):
        raise FileNotFoundError(f"could not load policy {str(path_or_id)!r}: no such directory (a Hub id is "
                                f"'name' or 'namespace/name')")
    offline = not local and not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(path_or_id, local_files_only=offline)
        vision = hasattr(config, "vision_config")
        auto_model = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        # use_kernels=False: transformers 5.25 otherwise swaps layers for Hub kernels (downloaded code) at load and
        # again at every train(); on CUDA, offline, train() raised (seen on an H200), and online the rollout's
        # inference kernels and the update's training kernels would give different log-probs
        model = auto_model.from_pretrained(path_or_id, dtype=dtype, local_files_only=offline, use_kernels=False)
        if vision:
            processor = ImageOnlyQwen3VLProcessor.from_pretrained(path_or_id, local_files_only=offline)
        else:
            processor = AutoTokenizer.from_pretrained(path_or_id, local_files_only=offline)
    except OSError as error:
        where = "a local checkpoint directory" if local else "a local checkpoint directory or go online"
        raise OSError(f"could not load policy {str(path_or_id)!r}: {error.__class__.__name__}: "
                      f"{str(error).splitlines()[0]} -- pass {where} (hub offline={offline})") from error
    return model.to(device).eval(), processor


def chat_messages(processor, registry, sample):
    """The prompt messages of one sample: registry system prompt + user turn with the images.

    A stored prompt (Sample.prompt, loaded only when asked) is used as is; "<image>" markers in its
    string contents become image parts. A text-only policy gets no image parts.
    """
    vision = is_vision_processor(processor)
    if sample.prompt is not None:
        messages = []
        for message in sample.prompt:
            content = message["content"]
            if isinstance(content, str):
                pieces = content.split("<image>")
                parts = [{"type": "text", "text": pieces[0]}]
                for piece in pieces[1:]:
                    parts += [{"type": "image"}] if vision else []
                    parts.append({"type": "text", "text": piece})
                content = parts
            messages.append({"role": message["role"], "content": content})
        return messages
    images = [{"type": "image"} for _ in sample.images] if vision else []
    return [{"role": "system", "content": system_prompt(registry)},
            {"role": "user", "content": images + [{"type": "text", "text": user_prompt(registry, sample.question)}]}]


PROMPT_CACHE_BYTES = 128 * 2 ** 20  # recent prompts kept: a toy test set many times over, or a few large images
_prompts = OrderedDict()  # (ids of processor, registry, sample; protocol) -> (those three, prompt, bytes), oldest first
_prompt_bytes = 0


def build_prompt(processor, registry, sample, protocol="ours"):
    """Tokenized prompt of one sample, ending with the assistant header of the chat template; under
    protocol 'upstream' its images are first resized as upstream's loader did (upstream_image).

    Returns {"input_ids": (1, P), "attention_mask": (1, P)} and for a vision processor also
    "pixel_values": (sum of patches, C*T*p*p), "image_grid_thw": (num_images, 3), "mm_token_type_ids": (1, P).
    A prompt is a function of the objects (registries and samples are not changed once built),
    so recent ones are kept: an evaluation set is processed once, not at every evaluation.
    """
    global _prompt_bytes
    key = (id(processor), id(registry), id(sample), protocol)
    if key in _prompts:
        _prompts.move_to_end(key)
        return dict(_prompts[key][3])
    prompt = _encode_prompt(processor, registry, sample, protocol)
    size = sum(t.numel() * t.element_size() for t in prompt.values() if isinstance(t, torch.Tensor))
    _prompts[key] = (processor, registry, sample, prompt, size)  # holding the objects keeps their ids theirs
    _prompt_bytes += size
    while _prompt_bytes > PROMPT_CACHE_BYTES:
        _prompt_bytes -= _prompts.popitem(last=False)[1][4]
    return dict(prompt)


def _encode_prompt(processor, registry, sample, protocol):
    text = processor.apply_chat_template(chat_messages(processor, registry, sample),
                                         add_generation_prompt=True, tokenize=False)
    if is_vision_processor(processor):
        num_markers = text.count(processor.image_token)
        if num_markers != len(sample.images):
            raise ValueError(f"sample {sample.id!r}: prompt has {num_markers} image markers but the sample "
                             f"has {len(sample.images)} images")
        images = [upstream_image(im) if protocol == "upstream" else im for im in sample.images] or None
        return dict(processor(text=[text], images=images, return_tensors="pt"))
    return dict(processor([text], return_tensors="pt", add_special_tokens=False))


def upstream_image(image, factor=28, min_pixels=4 * 28 ** 2, max_pixels=16384 * 28 ** 2):
    """An image as upstream's data loader gave it to the processor (verl's process_image ->
    qwen_vl_utils 0.0.14's fetch_image with image_patch_size=14): resized so that both sides are
    multiples of 28 and the area lies in [min_pixels, max_pixels]; the Qwen3-VL processor then
    resizes it again, to multiples of 32. The released checkpoint saw its images twice resized."""
    width, height = image.size
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"an image of {width}x{height}: its sides are more than 200 times apart, which "
                         "upstream's loader (and the Qwen processor) refuse")
    h, w = (max(factor, round(side / factor) * factor) for side in (height, width))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (math.floor(side / beta / factor) * factor for side in (height, width))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = (math.ceil(side * beta / factor) * factor for side in (height, width))
    return image.resize((w, h), Image.Resampling.BICUBIC)  # PIL's default for RGB, which fetch_image uses
