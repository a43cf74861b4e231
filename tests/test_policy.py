"""Tokenizer, image-only processor, policy builders and checkpoint loading (policy.py)."""
import time

import pytest
import torch
from PIL import Image

from data import Sample
from maestro import PROTOCOL_TAGS as PROTOCOL_TOKENS, system_prompt, user_prompt
from policy import (CHAT_TEMPLATE, ImageOnlyQwen3VLProcessor, build_policy, build_processor,
                    build_prompt, build_tokenizer, load_policy, save_policy)
from registry import Registry

REGISTRY = Registry.from_dict({
    "experts": [{"name": "Bar-Reader", "description": "reads bar charts", "base_url": "http://127.0.0.1:9/v1"}],
    "skills": [{"name": "Read_Bar", "level": 1, "description": "bar values", "implementation": "toy:read_bar"}],
})
CORPUS = ["What is the value of bar C in the chart?", "<search> Bar-Reader@@Read_Bar: value </search>",
          "<answer> 7 </answer>", system_prompt(REGISTRY)]


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(CORPUS, extra_tokens=("@@", "Bar-Reader")))


def sample(images=((64, 48),), prompt=None):
    return Sample(id="row-3", question="What is bar C?", images=tuple(Image.new("RGB", s, "white") for s in images),
                  ground_truths=("7",), data_source="toy", prompt=prompt)


def test_tokenizer_is_byte_level_with_atomic_protocol_tokens(processor):
    tokenizer = processor.tokenizer
    text = "Ünïcödé ✓ 数字 🎲 never seen\ttabs\n\n  spaces <search>x</search>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.unk_token_id is None
    for token in (*PROTOCOL_TOKENS, "@@", "Bar-Reader", "<|im_end|>", "<|image_pad|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("<answer> 7 </answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<answer> 7 </answer>"


def test_chat_template_is_qwen_style(processor):
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    "Q<|im_end|>\n<|im_start|>assistant\n")
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE


def test_build_prompt_expands_image_pads_per_grid(processor):
    prompt = build_prompt(processor, REGISTRY, sample(images=((64, 48), (100, 70))))
    grid = prompt["image_grid_thw"]
    pads = (prompt["input_ids"] == processor.image_token_id).sum().item()
    assert pads == (grid.prod(-1) // 4).sum().item()
    assert prompt["pixel_values"].shape == (grid.prod(-1).sum().item(), 3 * 2 * 16 * 16)
    text = processor.tokenizer.decode(prompt["input_ids"][0])
    assert text.startswith("<|im_start|>system\n" + system_prompt(REGISTRY))
    assert text.endswith(user_prompt(REGISTRY, "What is bar C?") + "<|im_end|>\n<|im_start|>assistant\n")


def test_prompts_are_kept_per_processor_registry_and_sample(processor, monkeypatch):
    """A prompt is encoded once per (processor, registry, sample) and reused, never across another
    registry (a renamed view) or sample; the kept prompts stay under PROMPT_CACHE_BYTES."""
    import policy
    first, other = sample(), sample()
    renamed = REGISTRY.renamed({"Bar-Reader": "expert-7"}, {"Read_Bar": "skill-9"})
    a, b = build_prompt(processor, REGISTRY, first), build_prompt(processor, REGISTRY, first)
    assert a["pixel_values"] is b["pixel_values"] and a is not b  # reused; callers get their own dict
    view = build_prompt(processor, renamed, first)
    assert "expert-7" in processor.tokenizer.decode(view["input_ids"][0])
    assert "expert-7" not in processor.tokenizer.decode(a["input_ids"][0])
    assert build_prompt(processor, REGISTRY, other)["pixel_values"] is not a["pixel_values"]
    monkeypatch.setattr(policy, "PROMPT_CACHE_BYTES", 1)  # nothing stays once the limit is this small
    build_prompt(processor, REGISTRY, sample())
    assert len(policy._prompts) == 0 and policy._prompt_bytes == 0
    assert build_prompt(processor, REGISTRY, first)["pixel_values"] is not a["pixel_values"]


def test_stored_prompt_image_markers_must_match_images(processor):
    stored = ({"role": "user", "content": "<image> what is bar C?"},)
    prompt = build_prompt(processor, REGISTRY, sample(prompt=stored))
    assert (prompt["input_ids"] == processor.image_token_id).any()
    with pytest.raises(ValueError, match="row-3.*1 image markers but the sample has 2 images"):
        build_prompt(processor, REGISTRY, sample(images=((32, 32), (32, 32)), prompt=stored))


def test_policy_sizes(processor):
    tiny = sum(p.numel() for p in build_policy(processor, "tiny").parameters())
    small = sum(p.numel() for p in build_policy(processor, "small").parameters())
    assert 0.15e6 < tiny < 0.4e6 and 2.0e6 < small < 3.0e6
    with pytest.raises(ValueError, match="unknown policy size 'huge'"):
        build_policy(processor, "huge")


def test_building_a_policy_follows_its_seed_and_leaves_the_callers_random_stream_alone(processor):
    """train.py seeds every rank's own stream before building: a build that reseeded torch would give
    every rank the same sampling (a group split over ranks would hold copies of one rollout)."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = build_policy(processor, "tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)
    second = build_policy(processor, "tiny", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_vision_policy_round_trip(processor, tmp_path):
    model = build_policy(processor, "tiny", seed=3)
    save_policy(model, processor, tmp_path)
    loaded, loaded_processor = load_policy(tmp_path)
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration" and not loaded.training
    assert isinstance(loaded_processor, ImageOnlyQwen3VLProcessor)
    assert loaded_processor.tokenizer.padding_side == "left"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    original = build_prompt(processor, REGISTRY, sample())
    reloaded = build_prompt(loaded_processor, REGISTRY, sample())
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    half, _ = load_policy(tmp_path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    # no Hub kernels, at load or at train(): on an H200, offline, train() raised resolving
    # 'kernels-community/rotary', and rollout and update would run different kernels
    loaded.train()
    assert not loaded.use_kernels and getattr(loaded, "_kernels_mode", None) is None


def test_text_only_policy_round_trip(processor, tmp_path):
    tokenizer = processor.tokenizer
    save_policy(build_policy(tokenizer, "tiny"), tokenizer, tmp_path)
    model, loaded_tokenizer = load_policy(tmp_path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    prompt = build_prompt(loaded_tokenizer, REGISTRY, sample())
    assert set(prompt) == {"input_ids", "attention_mask"}
    assert "<|image_pad|>" not in loaded_tokenizer.decode(prompt["input_ids"][0])


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match="Jinyang23/Maestro-4B.*local checkpoint directory or go online"):
        load_policy("Jinyang23/Maestro-4B")
    assert time.monotonic() - start < 5


def test_missing_local_directory_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-run/final.*no such directory"):
        load_policy(tmp_path / "no-such-run" / "final")
