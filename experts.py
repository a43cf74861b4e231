"""Frozen experts and auxiliary services, all spoken to over the OpenAI chat-completions format.

Read top to bottom:
  ExpertError, Reply, Call      what a call returns or records
  OpenAIChatClient              HTTP client: pooled session, whole-reply timeout, bounded retries
  LocalChatModel                in-process transformers backend with the same .chat
  image / bbox helpers          image_to_data_url, crop_to_bbox, parse_detections, parse_zoom_bbox
  Services                      OCR, caption, detection and zoom, with a bounded cache
  run_concurrently, build_backends
(the wire format's server side, for tests and the toy world's HTTP experts, is chatserver.py)

API keys are read from the environment at call time, sent only in the Authorization header, and
scrubbed from every error message and reply text, so they never reach logs, reprs or metrics.
"""
import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Sequence

import requests
import urllib3
from requests.adapters import HTTPAdapter
from PIL import Image, ImageDraw

from maestro import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, strip_think

log = logging.getLogger("maestro.experts")


class ExpertError(RuntimeError):
    """A failed expert or service call.

    kind: 'connection' | 'timeout' | 'http_429' | 'http_5xx' | 'http_4xx' | 'bad_response' | 'empty'
          | 'unavailable' (service not configured) | 'unsupported' (images sent to a text-only model)
          | 'circuit_open' (failing fast: the endpoint could not be reached on the last calls)
    name: the expert or service that failed.
    calls: what the skill spent before the failure (skills.ask_expert fills it in).
    retry_after: seconds a 429 reply asked the client to wait (None: back off as usual).
    """

    def __init__(self, kind: str, name: str, message: str, calls=(), retry_after: float | None = None):
        super().__init__(f"{name}: {kind}: {message}")
        self.kind = kind
        self.name = name
        self.calls = list(calls)
        self.retry_after = retry_after



@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency: float  # seconds, including retries: the time the caller waited
    truncated: bool = False  # the server stopped at its max_tokens (finish_reason 'length')


@dataclass
class Call:
    """One expert or service request made on behalf of a skill (for metrics and cost accounting)."""

    name: str
    kind: str  # 'expert' | 'service'
    skill: str
    prompt_tokens: int
    completion_tokens: int
    latency: float
    error: str | None = None  # ExpertError kind when the call failed
    truncated: bool = False  # the reply was cut at the server's max_tokens


class ChatBackend(Protocol):
    name: str

    def chat(self, text: str, images: Sequence[Image.Image] = (), system: str | None = None,
             **generation) -> Reply: ...


# ---------------------------------------------------------------------------------------------
# HTTP client

RETRYABLE = ("connection", "timeout", "http_429", "http_5xx")
MAX_REPLY_BYTES = 32 * 2**20  # a reply body larger than this is refused, not read into memory


class OpenAIChatClient:
    """POST {base_url}/chat/completions with bounded retries and exponential backoff.

    Thread safety: one requests.Session per client, shared by all threads. Its HTTPAdapter keeps a
    urllib3 pool (itself thread-safe) of up to `pool_size` connections; we keep no per-request
    state on the session (no cookies, auth or headers set on it), so concurrent posts are safe.

    Time: `timeout` bounds each attempt as a whole (a server that trickles its body byte by byte
    does not hold the caller past it); waits between attempts double from `backoff` and, like a
    429's Retry-After, never exceed `max_delay`.

    Circuit breaker: after `breaker_threshold` calls in a row that could not connect (retries
    exhausted), calls fail fast with kind 'circuit_open' for `breaker_cooldown` seconds instead of
    spending timeouts and backoff on a dead endpoint; after that, calls try it again.
    """

    def __init__(self, name, base_url, model, api_key_env=None, generation=None, timeout=120,
                 max_retries=2, backoff=0.5, pool_size=32, max_delay=30.0,
                 breaker_threshold=3, breaker_cooldown=10.0, image_encoding=("png", None)):
        self.name = name
        self.image_encoding = tuple(image_encoding)  # (format, JPEG quality): registry 'image_encoding'
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.generation = dict(generation or {})
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_delay = float(max_delay)
        self.breaker_threshold = int(breaker_threshold)
        self.breaker_cooldown = float(breaker_cooldown)
        self._breaker_lock = threading.Lock()
        self._connection_failures = 0  # calls in a row that ended in 'connection'
        self._open_until = 0.0         # time.monotonic() before which calls fail fast
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self):
        return f"OpenAIChatClient(name={self.name!r}, url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def chat(self, text, images=(), system=None, **generation) -> Reply:
        content = [{"type": "image_url", "image_url": {"url": image_to_data_url(im, *self.image_encoding)}}
                   for im in images]
        content.append({"type": "text", "text": text})
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, **self.generation, **generation}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        start = time.monotonic()
        attempt = 0
        while True:
            self._fail_fast_if_open()  # checked before every attempt: retries stop once it opens
            try:
                reply = self._post_once(body, headers, key, start)
            except ExpertError as err:
                if err.kind not in RETRYABLE or attempt == self.max_retries:
                    self._record_outcome(err.kind)
                    raise
                delay = min(err.retry_after or self.backoff * 2 ** attempt, self.max_delay)
                attempt += 1
                log.warning("expert %s: %s (attempt %d/%d), retrying in %.2fs",
                            self.name, err.kind, attempt, self.max_retries + 1, delay)
                time.sleep(delay)
            else:
                self._record_outcome(None)
                return reply

    def _fail_fast_if_open(self):
        with self._breaker_lock:
            wait, failures = self._open_until - time.monotonic(), self._connection_failures
        if wait > 0:
            raise ExpertError("circuit_open", self.name, f"the last {failures} calls could not connect to "
                              f"{self.url}; failing fast for {wait:.1f}s more before trying it again")

    def _record_outcome(self, kind):
        """Count calls in a row that could not connect; any reply from the server resets the count."""
        with self._breaker_lock:
            if kind == "connection":
                self._connection_failures += 1
                if self._connection_failures >= self.breaker_threshold:
                    if self._open_until <= time.monotonic():
                        log.warning("expert %s: %d calls in a row could not connect to %s; failing fast for %.0fs",
                                    self.name, self._connection_failures, self.url, self.breaker_cooldown)
                    self._open_until = time.monotonic() + self.breaker_cooldown
            else:
                self._connection_failures = 0

    def _post_once(self, body, headers, key, start) -> Reply:
        def fail(kind, message):
            return ExpertError(kind, self.name, scrub(message, key))

        deadline = time.monotonic() + self.timeout
        try:
            with self.session.post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True) as response:
                raw = bytearray()
                while chunk := response.raw.read1(2**16, decode_content=True):  # what has arrived, at once
                    raw += chunk
                    if len(raw) > MAX_REPLY_BYTES:
                        raise fail("bad_response", f"reply from {self.url} is over {MAX_REPLY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise requests.Timeout(f"the body was still arriving after {self.timeout}s")
        # timeouts first: ConnectTimeout is also a ConnectionError
        except (requests.Timeout, urllib3.exceptions.TimeoutError) as exc:
            raise fail("timeout", f"no reply from {self.url} within {self.timeout}s ({type(exc).__name__})")
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise fail("connection", f"cannot reach {self.url}: {type(exc).__name__}: {exc}")
        text = raw.decode("utf-8", errors="replace")  # for messages

        status = response.status_code
        if status >= 400:
            kind = "http_429" if status == 429 else "http_5xx" if status >= 500 else "http_4xx"
            err = fail(kind, f"HTTP {status} from {self.url}: {text[:300]}")
            if status == 429:
                err.retry_after = self._retry_after(response.headers.get("Retry-After"))
            raise err
        try:
            data = json.loads(bytes(raw))  # JSON is UTF-8 whatever the headers say
        except ValueError:
            raise fail("bad_response", f"non-JSON body from {self.url}: {text[:200]!r}")
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise fail("bad_response", f"reply from {self.url} has no 'choices' list")
        if not choices:
            raise fail("empty", f"reply from {self.url} has an empty 'choices' list")
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        if not isinstance(message, dict):
            raise fail("bad_response", f"choices[0] from {self.url} has no 'message' object")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise fail("empty", f"choices[0].message.content from {self.url} is missing or empty")
        usage = data.get("usage") or {}
        tokens = [usage.get(k) or 0 for k in ("prompt_tokens", "completion_tokens")] if isinstance(usage, dict) else [None]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in tokens):
            raise fail("bad_response", f"'usage' from {self.url} must be an object of token counts, got {usage!r:.200}")
        # a server that echoes request headers must not put the key into observations and logs
        return Reply(scrub(content, key), *tokens, time.monotonic() - start,
                     truncated=choices[0].get("finish_reason") == "length")

    def _retry_after(self, header) -> float | None:
        try:
            seconds = float(header)
        except (TypeError, ValueError):
            return None  # absent or an HTTP date: fall back to exponential backoff
        return max(seconds, 0.0)


def scrub(message: str, key: str) -> str:
    """Remove an API key from a message (a server may echo request headers in its error body)."""
    return message.replace(key, "***") if key else message


# ---------------------------------------------------------------------------------------------
# In-process backend


class LocalChatModel:
    """A frozen transformers model from a local directory, decoded greedily (frozen experts are
    deterministic here; temperature/top_p in **generation are ignored, max_tokens is honoured).

    A directory whose config has a vision_config is loaded as an image-text-to-text model with its
    processor; anything else as a text-only causal LM, which refuses images instead of silently
    answering without them. Loading is lazy (first chat) and calls are serialised by a lock.
    """

    def __init__(self, name, path, generation=None, device="cpu"):
        self.name, self.path, self.device = name, str(path), device
        self.generation = dict(generation or {})
        self._lock = threading.Lock()
        self._model = self._processor = None

    def __repr__(self):
        return f"LocalChatModel(name={self.name!r}, path={self.path!r})"

    def _load(self):
        import transformers as tf

        config = tf.AutoConfig.from_pretrained(self.path)
        self.is_vision = hasattr(config, "vision_config")
        if self.is_vision:
            self._model = tf.AutoModelForImageTextToText.from_pretrained(self.path, use_kernels=False)  # as load_policy
            self._processor = tf.AutoProcessor.from_pretrained(self.path)
        else:
            self._model = tf.AutoModelForCausalLM.from_pretrained(self.path, use_kernels=False)
            self._processor = tf.AutoTokenizer.from_pretrained(self.path)
        self._model.to(self.device).eval()

    def chat(self, text, images=(), system=None, **generation) -> Reply:
        import torch

        start = time.monotonic()
        with self._lock:
            if self._model is None:
                self._load()
            if images and not self.is_vision:
                raise ExpertError("unsupported", self.name,
                                  f"{len(images)} image(s) sent to the text-only model at {self.path}")
            content = ([*({"type": "image"} for _ in images), {"type": "text", "text": text}]
                       if self.is_vision else text)
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if self.is_vision:
                inputs = self._processor(text=[prompt], images=list(images) or None, return_tensors="pt")
            else:
                inputs = self._processor([prompt], return_tensors="pt", add_special_tokens=False)
            inputs = inputs.to(self.device)
            max_tokens = int({**self.generation, **generation}.get("max_tokens", 512))
            tokenizer = getattr(self._processor, "tokenizer", self._processor)
            with torch.no_grad():
                out = self._model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            prompt_len = inputs["input_ids"].shape[1]
            reply = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
        return Reply(reply, prompt_len, int(out.shape[1] - prompt_len), time.monotonic() - start)


# ---------------------------------------------------------------------------------------------
# Images, boxes and parsing of service replies


def image_to_data_url(image: Image.Image, image_format: str = "png", quality: int | None = None) -> str:
    """A base64 data URL: PNG by default (lossless, so OCR sees exactly the pixels the policy saw),
    or JPEG of RGB pixels at `quality` (what upstream sent its experts, at PIL's default 75)."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality or 75)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pixel_box(bbox, image_size, frame_size=None) -> tuple[int, int, int, int] | None:
    """A bbox given in `frame_size` coordinates (w, h; default the image's own) as an ordered,
    clamped pixel box (x1, y1, x2, y2) of an image of `image_size`; None if malformed or empty."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    width, height = image_size
    frame_w, frame_h = frame_size or image_size
    sx, sy = width / frame_w, height / frame_h
    left, right = sorted((x1 * sx, x2 * sx))
    top, bottom = sorted((y1 * sy, y2 * sy))
    left, top = max(0, math.floor(left)), max(0, math.floor(top))
    right, bottom = min(width, math.ceil(right)), min(height, math.ceil(bottom))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


def crop_to_bbox(image: Image.Image, bbox, frame_size=None) -> Image.Image | None:
    """Crop `bbox` (in the coordinate frame `frame_size` the service saw) out of the real image;
    None when the box is malformed or has no area inside the image."""
    box = pixel_box(bbox, image.size, frame_size)
    return image.crop(box) if box else None


def first_json(text: str):
    """The first JSON value in a model reply (code fences and surrounding prose allowed); None if
    there is none. Only json is used to parse model output, never eval."""
    text = re.sub(r"```(?:json)?", "", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except ValueError:
            continue
    return None


def parse_detections(text: str, image_size) -> list[dict] | None:
    """Detection reply -> [{"label", "bbox": [x1, y1, x2, y2]}] in image pixels (items without a
    usable box are left out); None when the reply holds no JSON list of objects at all."""
    data = first_json(text)
    if isinstance(data, dict):
        data = data.get("objects")
    if not isinstance(data, list):
        return None
    objects = []
    for item in data:
        if not isinstance(item, dict):
            continue
        box = pixel_box(item.get("bbox_2d", item.get("bbox")), image_size)
        if box:
            objects.append({"label": str(item.get("label", "object")), "bbox": list(box)})
    return objects


def parse_zoom_bbox(text: str):
    """Zoom reply -> bbox list or None. Accepts {"bbox_2d": [...]}, optionally wrapped as a tool
    call {"name": ..., "arguments": {"bbox_2d": [...]}} and/or inside <tool_call>...</tool_call>."""
    tool_call = re.search(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    data = first_json(tool_call.group(1) if tool_call else text)
    if isinstance(data, dict) and isinstance(data.get("arguments"), dict):
        data = data["arguments"]
    return data.get("bbox_2d") if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# Auxiliary services

COCO_CATEGORIES = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign, "
    "parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella, "
    "handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, "
    "surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, "
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop, "
    "mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, "
    "teddy bear, hair drier, toothbrush")

# Each service is asked in its own model's interface (the paper's models: GLM-OCR takes the bare
# "Text Recognition:" instruction; the detector lists categories and answers bbox_2d JSON; DeepEyes
# calls an image_zoom_in tool inside <tool_call> tags); the sentences around them are ours.
SERVICE_PROMPTS = {
    "ocr": "Text Recognition:",
    "caption": "Describe this image for someone who must answer questions about it without seeing it: "
               "the objects and how many there are, colours, positions relative to each other, and any "
               "text, numbers, labels, axes or legends. State only what is visible.",
    "detection": "Locate every instance of these object categories in the image: " + COCO_CATEGORIES + ". "
                 'Output the coordinates in JSON format: a list of {"bbox_2d": [x1, y1, x2, y2], "label": "<category>"}.',
    "zoom": "{question}\n\nThink about the question first. If one region of the image must be seen more closely to "
            "answer it, call image_zoom_in on that region; then give your answer. Format: "
            f"{THINK_OPEN} ... {THINK_CLOSE} <tool_call> ... </tool_call> (only if needed) {ANSWER_OPEN} ... {ANSWER_CLOSE}",
}
ZOOM_SYSTEM = (
    "You can call one function to look closer at the image.\n<tools>\n"
    '{"type": "function", "function": {"name": "image_zoom_in", "description": "Magnify a region of the image '
    'given by its bounding box in pixels.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": '
    '"array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4, "description": "[x1, y1, x2, y2]"}}, '
    '"required": ["bbox_2d"]}}}\n</tools>\n'
    "To call it, write a JSON object with the function name and its arguments between <tool_call></tool_call> "
    'tags: <tool_call>{"name": "image_zoom_in", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>')
ZOOM_GENERATION = {"temperature": 0.0, "stop": ["<|im_end|>\n", ANSWER_CLOSE, "</tool_call>"]}


def draw_boxes(image: Image.Image, objects: list[dict]) -> Image.Image:
    """A copy of `image` with each detected object's box (green) and label (red on green) drawn on
    it, so an expert can check the detections against the picture."""
    boxed = image.convert("RGB")
    draw = ImageDraw.Draw(boxed)
    for obj in objects:
        x1, y1, x2, y2 = obj["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=(0, 200, 0), width=2)
        left, top, right, bottom = draw.textbbox((x1, y1), obj["label"])
        draw.rectangle((left, max(0, top - (bottom - top)), right, top), fill=(0, 200, 0))
        draw.text((left, max(0, top - (bottom - top))), obj["label"], fill=(220, 0, 0))
    return boxed


class Services:
    """OCR, caption, detection and zoom, each one chat call to its own endpoint; replies come back
    without their reasoning (maestro.strip_think), as an expert's do.

    Results are kept in a bounded LRU keyed by (service, image pixels hash, prompt); failures are
    not cached. A service absent from the registry raises ExpertError(kind='unavailable'), and like
    every failure it is recorded as a Call with that error, so skills can carry on without it.
    Two threads missing the cache on the same key at once both call the service (harmless).
    """

    def __init__(self, registry_services, backends=None, cache_size=256):
        self.backends = {
            name: OpenAIChatClient(name, s.base_url, s.model, s.api_key_env, s.generation, s.timeout, s.max_retries,
                                   image_encoding=s.image_encoding)
            for name, s in registry_services.items()
        }
        self.backends.update(backends or {})
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def ocr(self, image, calls, skill="") -> str:
        return self._ask("ocr", [image], SERVICE_PROMPTS["ocr"], calls, skill)

    def caption(self, image, calls, skill="") -> str:
        return self._ask("caption", [image], SERVICE_PROMPTS["caption"], calls, skill)

    def detect(self, image, calls, skill="") -> list[dict]:
        """The detected objects; a reply with no list of objects fails as bad_response (its Call
        records it), so skills write the detector as unavailable instead of "nothing detected"."""
        reply = self._ask("detection", [image], SERVICE_PROMPTS["detection"], calls, skill)
        objects = parse_detections(reply, image.size)
        if objects is None:
            calls[-1].error = "bad_response"
            raise ExpertError("bad_response", "detection", f"expected a JSON list of objects, got {reply[:200]!r}")
        return objects

    def zoom(self, image, question, calls, skill="", hint_images=()) -> Image.Image | None:
        """The region the zoom service asks to magnify (an image_zoom_in tool call), cropped from
        `image`; None if it declines (replies without a tool call). A tool call with no box in it
        fails as bad_response, recorded on its Call. `hint_images` (e.g. the image with detections
        drawn) are shown after it. The image is sent as-is, so the service's coordinates are in its frame."""
        reply = self._ask("zoom", [image, *hint_images], SERVICE_PROMPTS["zoom"].format(question=question), calls,
                          skill, ZOOM_SYSTEM, ZOOM_GENERATION)
        bbox = parse_zoom_bbox(reply)
        if bbox is None and "<tool_call>" in reply:
            calls[-1].error = "bad_response"
            raise ExpertError("bad_response", "zoom", f"a tool call without a bbox_2d: {reply[:200]!r}")
        return crop_to_bbox(image, bbox, frame_size=image.size) if bbox is not None else None

    def _ask(self, service, images, prompt, calls, skill, system=None, generation=None) -> str:
        pixels = [hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest() for im in images]
        key = (service, *pixels, prompt)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                calls.append(Call(service, "service", skill, 0, 0, 0.0))
                return self._cache[key]
        backend = self.backends.get(service)
        try:
            if backend is None:
                raise ExpertError("unavailable", service, f"no '{service}' service is configured in the registry")
            reply = backend.chat(prompt, list(images), system=system, **(generation or {}))
        except ExpertError as err:
            calls.append(Call(service, "service", skill, 0, 0, 0.0, error=err.kind))
            raise
        calls.append(Call(service, "service", skill, reply.prompt_tokens, reply.completion_tokens, reply.latency,
                          truncated=reply.truncated))
        text = strip_think(reply.text)  # a reasoning captioner's musings are no evidence for the expert
        with self._lock:
            self._cache[key] = text
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return text


# ---------------------------------------------------------------------------------------------
# Concurrency and wiring


def run_concurrently(fn, items, max_workers) -> list:
    """[fn(item) for item in items] on up to max_workers threads; results in order, exceptions
    returned in place of results. The pool lives only for this call, so no threads outlive it."""
    items = list(items)
    if not items:
        return []

    def guarded(item):
        try:
            return fn(item)
        except Exception as exc:  # returned to the caller, who decides per item
            return exc

    workers = max(1, min(int(max_workers), len(items)))
    if workers == 1:  # nothing to overlap: no thread to start
        return [guarded(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(guarded, items))


def build_backends(registry, overrides=None, base_url="") -> dict:
    """{expert name: backend} for every registry expert; overrides (by expert name) win; base_url,
    when given, is the one OpenAI-compatible endpoint of every expert instead of each entry's own."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(registry.experts))
    if unknown:
        raise ValueError(f"backend overrides name experts not in the registry {registry.source}: {unknown}; "
                         f"known experts: {sorted(registry.experts)}")
    backends = {}
    for name, expert in registry.experts.items():
        if name in overrides:
            backends[name] = overrides[name]
        elif expert.base_url or base_url:
            backends[name] = OpenAIChatClient(name, base_url or expert.base_url, expert.model, expert.api_key_env,
                                              expert.generation, expert.timeout, expert.max_retries,
                                              image_encoding=expert.image_encoding)
        elif expert.local_path:
            backends[name] = LocalChatModel(name, expert.local_path, expert.generation)
        else:
            raise ValueError(f"expert {name!r} in {registry.source} has neither base_url nor local_path "
                             f"and no backend override")
    return backends
