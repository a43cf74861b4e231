"""experts.py against real HTTP servers on 127.0.0.1 (chatserver.OpenAICompatServer)."""

import base64
import io
import logging
import socket
import threading
import time

import pytest
from PIL import Image

import experts
from chatserver import OpenAICompatServer
from experts import (Call, ExpertError, OpenAIChatClient, Services, build_backends, crop_to_bbox,
                     image_to_data_url, parse_detections, parse_zoom_bbox, run_concurrently)
from registry import Registry, RegistryError, Service


class Recorder:
    """respond() that records every request and replays a script of results (last one repeats)."""

    def __init__(self, *script, delay=0.0):
        self.script, self.delay = list(script) or ["ok"], delay
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            result = self.script[min(len(self.requests), len(self.script)) - 1]
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        return result


def client(server, **kwargs):
    kwargs = {"backoff": 0.01, "timeout": 5, **kwargs}
    return OpenAIChatClient("test-expert", server.url, "served-model", **kwargs)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def decode(url):
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_chat_request_format_and_reply():
    recorder = Recorder("the answer")
    images = [Image.new("RGB", (8, 6), "red"), Image.new("RGB", (4, 4), "blue")]
    with OpenAICompatServer(recorder) as server:
        reply = client(server, generation={"temperature": 0.2}).chat("what?", images, system="be brief", max_tokens=7)
    assert reply.text == "the answer" and reply.completion_tokens == 2 and reply.prompt_tokens == 3  # whitespace words
    assert reply.latency > 0
    request = recorder.requests[0]
    assert request["model"] == "served-model" and request["temperature"] == 0.2 and request["max_tokens"] == 7
    system, user = request["messages"]
    assert system == {"role": "system", "content": "be brief"}
    parts = user["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"] and parts[2]["text"] == "what?"
    assert [decode(p["image_url"]["url"]).size for p in parts[:2]] == [(8, 6), (4, 4)]
    assert decode(parts[0]["image_url"]["url"]).convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_models_endpoint_and_unknown_route():
    import requests
    with OpenAICompatServer(Recorder(), model_names=("a", "b")) as server:
        models = requests.get(server.url + "/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["a", "b"]
        assert requests.post(server.url + "/nowhere", json={}, timeout=5).status_code == 404


def test_retries_5xx_then_succeeds():
    recorder = Recorder((500, {"error": "boom"}, {}), (503, "busy", {}), "fine")
    with OpenAICompatServer(recorder) as server:
        assert client(server, max_retries=2).chat("q").text == "fine"
    assert len(recorder.requests) == 3


def test_exception_in_respond_is_a_500_and_retried():
    calls = []

    def respond(request):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("handler crashed")
        return "recovered"

    with OpenAICompatServer(respond) as server:
        assert client(server, max_retries=1).chat("q").text == "recovered"


def test_429_honours_retry_after():
    recorder = Recorder((429, {"error": "slow down"}, {"Retry-After": "1"}), "done")
    with OpenAICompatServer(recorder) as server:
        start = time.monotonic()
        assert client(server, backoff=0.001).chat("q").text == "done"
        assert time.monotonic() - start >= 0.9  # waited what the server asked, not the 1 ms backoff
    assert len(recorder.requests) == 2


def test_429_retry_after_is_capped():
    recorder = Recorder((429, "", {"Retry-After": "3600"}), "done")
    with OpenAICompatServer(recorder) as server:
        api = client(server, max_delay=0.05)
        assert api.chat("q").text == "done"


def test_429_exhausts_retries():
    recorder = Recorder((429, "", {}))
    with OpenAICompatServer(recorder) as server:
        with pytest.raises(ExpertError) as info:
            client(server, max_retries=2).chat("q")
    assert info.value.kind == "http_429" and len(recorder.requests) == 3


def test_no_retry_on_4xx():
    recorder = Recorder((400, {"error": "bad request"}, {}))
    with OpenAICompatServer(recorder) as server:
        with pytest.raises(ExpertError) as info:
            client(server, max_retries=3).chat("q")
    assert info.value.kind == "http_4xx" and info.value.name == "test-expert"
    assert "400" in str(info.value) and len(recorder.requests) == 1


def test_timeout_is_bounded_by_attempts():
    recorder = Recorder("late", delay=1.5)
    with OpenAICompatServer(recorder) as server:
        start = time.monotonic()
        with pytest.raises(ExpertError) as info:
            client(server, timeout=0.2, max_retries=1).chat("q")
        elapsed = time.monotonic() - start
    assert info.value.kind == "timeout" and len(recorder.requests) == 2
    assert elapsed < 0.2 * 2 + 1.0  # two attempts and a short backoff, never the 1.5 s server delay


class DripServer:
    """A raw HTTP server that sends its headers at once, then its JSON body one byte per `gap` s."""

    def __init__(self, gap):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                body = b'{"choices": [{"message": {"content": "ok"}}]}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(gap)
                except OSError:  # the client gave up
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_timeout_bounds_a_body_that_trickles_in():
    server = DripServer(gap=0.1)  # ~4.5 s for the whole body; every single read comes within 0.5 s
    try:
        start = time.monotonic()
        with pytest.raises(ExpertError) as info:
            OpenAIChatClient("drip", server.url, "m", timeout=0.5, max_retries=0).chat("q")
        assert info.value.kind == "timeout" and time.monotonic() - start < 2.0
    finally:
        server.close()


def test_waits_between_attempts_never_exceed_max_delay():
    recorder = Recorder((500, "busy", {}), (500, "busy", {}), "fine")
    with OpenAICompatServer(recorder) as server:
        start = time.monotonic()
        assert client(server, backoff=60, max_delay=0.05, max_retries=2).chat("q").text == "fine"
        assert time.monotonic() - start < 5  # two 60 s and 120 s backoffs, each capped at 0.05 s


def test_a_reply_cut_at_max_tokens_is_marked_and_counted():
    cut = {"choices": [{"message": {"content": "The answer is"}, "finish_reason": "length"}]}
    with OpenAICompatServer(Recorder(cut, "whole")) as server:
        api = client(server)
        assert api.chat("q").truncated is True and api.chat("q").truncated is False


def test_connection_refused():
    api = OpenAIChatClient("nobody-home", closed_port_url(), "m", max_retries=1, backoff=0.01)
    with pytest.raises(ExpertError) as info:
        api.chat("q")
    assert info.value.kind == "connection" and "nobody-home" in str(info.value)


def test_the_breaker_says_once_that_it_opened(caplog):
    """Calls in flight when the breaker opens fail after it: each counts, and the log says it
    opened once, not once per call."""
    import socketserver

    class HangUp(socketserver.BaseRequestHandler):
        def handle(self):  # accept, keep the caller waiting, close without a reply
            time.sleep(0.3)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HangUp)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level(logging.WARNING, logger="maestro.experts")
    try:
        api = OpenAIChatClient("hangs-up", f"http://127.0.0.1:{server.server_address[1]}/v1", "m", max_retries=0,
                               breaker_threshold=2, breaker_cooldown=60, timeout=5)
        together = run_concurrently(lambda _: api.chat("q"), range(4), max_workers=4)
        with pytest.raises(ExpertError) as after:
            api.chat("q")
    finally:
        server.shutdown()
        server.server_close()
    assert [e.kind for e in together] == ["connection"] * 4 and after.value.kind == "circuit_open"
    opened = [r.getMessage() for r in caplog.records if "failing fast" in r.getMessage()]
    assert len(opened) == 1 and "hangs-up" in opened[0]


def test_the_body_is_json_bytes_whatever_its_encoding():
    """RFC 8259 JSON is UTF-8 (json.loads of bytes also reads UTF-16/32): a body in another
    encoding still parses, and bytes that are no text are a bad_response, never replaced text."""
    import json
    reply = {"choices": [{"message": {"content": "Größe: 7 µm"}}]}
    with OpenAICompatServer(Recorder((200, json.dumps(reply, ensure_ascii=False).encode("utf-16"), {}))) as server:
        assert client(server).chat("q").text == "Größe: 7 µm"
    broken = b'{"choices": [{"message": {"content": "7 \xff\xfe"}}]}'
    with OpenAICompatServer(Recorder((200, broken, {}))) as server:
        with pytest.raises(ExpertError) as info:
            client(server).chat("q")
    assert info.value.kind == "bad_response"


@pytest.mark.parametrize("body, kind", [
    ((200, "<html>not json</html>", {}), "bad_response"),
    ({"id": "x"}, "bad_response"),
    ({"choices": []}, "empty"),
    ({"choices": [{"message": {"role": "assistant", "content": None}}]}, "empty"),
    ({"choices": [{"message": {"role": "assistant", "content": "  "}}]}, "empty"),
    ({"choices": [{"text": "legacy"}]}, "bad_response"),
    ({"choices": [{"message": {"content": "17"}}], "usage": {"prompt_tokens": "n/a"}}, "bad_response"),
    ({"choices": [{"message": {"content": "17"}}], "usage": "none"}, "bad_response"),
])
def test_malformed_bodies(body, kind):
    recorder = Recorder(body)
    with OpenAICompatServer(recorder) as server:
        with pytest.raises(ExpertError) as info:
            client(server).chat("q")
    assert info.value.kind == kind and len(recorder.requests) == 1  # not retried


def test_concurrent_calls_overlap():
    recorder = Recorder("pong", delay=0.2)
    with OpenAICompatServer(recorder) as server:
        api = client(server)
        replies = run_concurrently(lambda i: api.chat(f"ping {i}").text, range(16), max_workers=16)
    assert replies == ["pong"] * 16
    assert recorder.max_in_flight >= 8


def test_run_concurrently_keeps_order_and_returns_exceptions():
    def work(i):
        if i == 3:
            raise ValueError("three")
        time.sleep(0.01 * (5 - i))
        return i * i

    before = threading.active_count()
    results = run_concurrently(work, range(6), max_workers=4)
    assert results[:3] == [0, 1, 4] and results[4:] == [16, 25]
    assert isinstance(results[3], ValueError)
    assert run_concurrently(work, [], max_workers=4) == []
    assert threading.active_count() == before  # the pool's threads are gone


def test_api_key_used_but_never_leaked(monkeypatch, caplog):
    secret = "sk-very-secret-0123456789"
    monkeypatch.setenv("MAESTRO_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)

    def echo_headers(request):  # a hostile server that echoes the request headers in its error
        return 400, {"error": f"bad auth {request['_headers']}"}, {}

    texts = []
    seen = Recorder("ok")
    with OpenAICompatServer(seen) as server:
        api = client(server, api_key_env="MAESTRO_TEST_KEY", max_retries=1)
        assert api.chat("q").text == "ok"
        texts += [repr(api), str(vars(api))]
    assert seen.requests[0]["_headers"]["Authorization"] == f"Bearer {secret}"

    scripts = [echo_headers, Recorder((500, secret, {})), Recorder((429, "", {})),
               Recorder((200, "not json " + secret, {})), Recorder({"choices": []}),
               Recorder("late", delay=1.0)]
    kinds = set()
    for recorder in scripts:
        with OpenAICompatServer(recorder) as server:
            api = client(server, api_key_env="MAESTRO_TEST_KEY", max_retries=1, timeout=0.3)
            with pytest.raises(ExpertError) as info:
                api.chat("q")
        kinds.add(info.value.kind)
        texts += [str(info.value), repr(info.value), repr(info.value.args), repr(api)]
    api = OpenAIChatClient("gone", closed_port_url(), "m", api_key_env="MAESTRO_TEST_KEY", max_retries=0)
    with pytest.raises(ExpertError) as info:
        api.chat("q")
    kinds.add(info.value.kind)
    texts.append(str(info.value))
    assert kinds == {"http_4xx", "http_5xx", "http_429", "bad_response", "empty", "timeout", "connection"}
    texts += [record.getMessage() for record in caplog.records]
    assert caplog.records  # the retries were logged
    assert not [t for t in texts if secret in t]


def test_crop_to_bbox_clamps_orders_and_rescales():
    image = Image.new("RGB", (200, 100))
    assert crop_to_bbox(image, [10, 20, 50, 60]).size == (40, 40)
    assert crop_to_bbox(image, [50, 60, 10, 20]).size == (40, 40)  # reversed corners
    assert crop_to_bbox(image, [-30, -5, 500, 400]).size == (200, 100)  # clamped
    # the service saw a 100x50 resize: its box maps to twice the size on the real image
    assert crop_to_bbox(image, [10, 10, 30, 20], frame_size=(100, 50)).size == (40, 20)
    assert crop_to_bbox(image, [10.2, 10.7, 10.9, 11.1]).size == (1, 2)  # sub-pixel boxes grow outwards
    for bad in ([5, 5, 5, 50], [300, 0, 400, 50], [1, 2, 3], "import os", [1, 2, "x", 4], [0, 0, float("nan"), 4], None):
        assert crop_to_bbox(image, bad) is None


def test_parse_service_replies_without_eval():
    size = (100, 100)
    fenced = '```json\n[{"label": "cat", "bbox_2d": [10, 10, 40, 30]}, {"label": "dog", "bbox": [90, 90, 70, 120]}]\n```'
    assert parse_detections(fenced, size) == [{"label": "cat", "bbox": [10, 10, 40, 30]},
                                              {"label": "dog", "bbox": [70, 90, 90, 100]}]
    assert parse_detections('Found: {"objects": [{"label": "cup", "bbox_2d": [1, 2, 3, 4]}]}', size) == [
        {"label": "cup", "bbox": [1, 2, 3, 4]}]
    assert parse_detections('[{"bbox_2d": [1]}, "cat"]', size) == [] and parse_detections("[]", size) == []
    for garbage in ("no objects", "[1, 2", '{"objects": 5}', "__import__('os').system('x')"):
        assert parse_detections(garbage, size) is None
    assert parse_zoom_bbox('<think>hmm</think><tool_call>{"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</tool_call>') == [1, 2, 3, 4]
    assert parse_zoom_bbox('{"bbox_2d": [5, 6, 7, 8]}') == [5, 6, 7, 8]
    assert parse_zoom_bbox("NONE") is None and parse_zoom_bbox("<tool_call>eval('1')") is None


def service_registry(url, names=("ocr", "caption", "detection", "zoom")):
    return {n: Service(n, url, f"{n}-model", None, {"temperature": 0.0}, 5.0, 0) for n in names}


def test_services_cache_and_failures(monkeypatch):
    replies = {"ocr-model": "HELLO 42", "detection-model": '[{"label": "box", "bbox_2d": [0, 0, 5, 5]}]',
               "zoom-model": '<tool_call>{"arguments": {"bbox_2d": [2, 2, 6, 8]}}</tool_call>'}
    seen = []

    def respond(request):
        seen.append(request)
        return replies.get(request["model"], (500, "down", {}))

    image, other = Image.new("RGB", (10, 10), "white"), Image.new("RGB", (10, 10), "black")
    with OpenAICompatServer(respond) as server:
        services = Services(service_registry(server.url, ("ocr", "detection", "zoom", "caption")), cache_size=2)
        calls = []
        assert services.ocr(image, calls, skill="s") == "HELLO 42"
        assert services.ocr(image, calls, skill="s") == "HELLO 42"  # cached
        assert len(seen) == 1
        assert [(c.name, c.kind, c.skill, c.error) for c in calls] == [("ocr", "service", "s", None)] * 2
        assert calls[1].latency == 0.0 and calls[1].completion_tokens == 0
        assert services.detect(image, calls) == [{"label": "box", "bbox": [0, 0, 5, 5]}]
        assert seen[0]["messages"][-1]["content"][-1]["text"] == "Text Recognition:"  # GLM-OCR's instruction
        assert "toothbrush" in seen[-1]["messages"][-1]["content"][-1]["text"]  # the detector's category list
        assert services.zoom(image, "where?", calls).size == (4, 6)
        zoom = seen[-1]  # DeepEyes' interface: the image_zoom_in tool in the system prompt, its stop strings
        assert "where?" in zoom["messages"][-1]["content"][-1]["text"]
        assert "image_zoom_in" in zoom["messages"][0]["content"] and "</tool_call>" in zoom["stop"]
        services.ocr(other, calls)  # cache holds 2: the first OCR entry is evicted by now
        services.ocr(image, calls)
        assert [r["model"] for r in seen].count("ocr-model") == 3
        for _ in range(2):  # failures are recorded and not cached
            with pytest.raises(ExpertError) as info:
                services.caption(image, calls)
            assert info.value.kind == "http_5xx" and calls[-1].error == "http_5xx"
        assert [r["model"] for r in seen].count("caption-model") == 2
    missing = Services({})
    with pytest.raises(ExpertError) as info:
        missing.ocr(image, calls)
    assert info.value.kind == "unavailable" and calls[-1] == Call("ocr", "service", "", 0, 0, 0.0, "unavailable")


def test_build_backends():
    registry = Registry.from_dict({
        "experts": [{"name": "remote", "description": "d", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                     "generation": {"temperature": 0.2}, "timeout": 7, "max_retries": 1},
                    {"name": "local", "description": "d", "local_path": "/nonexistent/model"},
                    {"name": "toy", "description": "d", "base_url": "http://127.0.0.1:9/v1"}],
        "skills": [{"name": "chart", "level": 1, "description": "d", "implementation": "chart:solve"}],
    })

    class Toy:
        name = "toy"

    backends = build_backends(registry, overrides={"toy": Toy()})
    remote = backends["remote"]
    assert isinstance(remote, OpenAIChatClient) and remote.model == "m" and remote.timeout == 7
    assert remote.max_retries == 1 and remote.generation == {"temperature": 0.2}
    assert isinstance(backends["local"], experts.LocalChatModel)  # loads lazily, so no error yet
    assert isinstance(backends["toy"], Toy)
    with pytest.raises(ValueError, match="tyo"):
        build_backends(registry, overrides={"tyo": Toy()})


def test_server_stops_cleanly():
    server = OpenAICompatServer(Recorder()).start()
    url = server.url
    server.stop()
    with pytest.raises(ExpertError) as info:
        OpenAIChatClient("x", url, "m", max_retries=0).chat("q")
    assert info.value.kind == "connection"


def test_local_chat_model_text_only(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["what is two plus two? four. hello expert, answer briefly."] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=template)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model = experts.LocalChatModel("tiny", tmp_path)
    first = model.chat("what is two plus two?", system="answer briefly", max_tokens=5)
    again = model.chat("what is two plus two?", system="answer briefly", max_tokens=5)
    assert isinstance(first.text, str) and first.text == again.text  # greedy is deterministic
    assert 0 < first.completion_tokens <= 5 and first.prompt_tokens > 5
    assert not model._model.use_kernels  # no Hub kernels (load_policy's reason)
    with pytest.raises(ExpertError) as info:
        model.chat("describe", [Image.new("RGB", (4, 4))])
    assert info.value.kind == "unsupported" and "text-only" in str(info.value)


def test_image_to_data_url_round_trip():
    image = Image.new("P", (3, 2))
    assert decode(image_to_data_url(image)).size == (3, 2)
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    assert decode(image_to_data_url(rgba)).getpixel((0, 0)) == (1, 2, 3, 4)


SKILL = {"name": "S", "level": 1, "description": "d", "implementation": "toy:read_bar"}


def test_image_encoding_of_the_registry_reaches_the_wire():
    """'image_encoding': jpeg sends JPEG data URLs at the given quality (upstream's re-encoding);
    the default stays lossless PNG; a bad value is a config error that names the key."""
    seen = []
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    with OpenAICompatServer(lambda request: seen.append(request) or "ok") as server:
        for encoding, prefix in (({"format": "jpeg", "quality": 75}, "data:image/jpeg;base64,"),
                                 ({"format": "png"}, "data:image/png;base64,")):
            registry = Registry.from_dict({"experts": [{"name": "E", "description": "d", "base_url": server.url}],
                                           "skills": [SKILL], "image_encoding": encoding})
            build_backends(registry)["E"].chat("hi", [image])
            assert seen[-1]["messages"][-1]["content"][0]["image_url"]["url"].startswith(prefix)
    jpeg = seen[0]["messages"][-1]["content"][0]["image_url"]["url"].split(",", 1)[1]
    decoded = Image.open(io.BytesIO(base64.b64decode(jpeg)))
    assert decoded.format == "JPEG" and decoded.size == (16, 16)
    for bad in ({"format": "gif"}, {"format": "jpeg", "quality": 0}, {"format": "png", "level": 3}):
        with pytest.raises(RegistryError, match="image_encoding"):
            Registry.from_dict({"experts": [{"name": "E", "description": "d", "base_url": "http://127.0.0.1:9/v1"}],
                                "skills": [SKILL], "image_encoding": bad})
