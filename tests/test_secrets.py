"""API keys: read only from the environment variable a registry entry names, sent only in the
Authorization header, and never written anywhere else -- not in logs, stdout/stderr, observations,
Call records, error counts, exceptions (with their chained causes), metrics, results files or
checkpoints -- even when experts fail in every way or echo the request headers back.
"""
import json
import logging
import time
import traceback

import pytest
from PIL import Image

import toyworld
from data import Sample
from environment import Environment
from chatserver import OpenAICompatServer
from experts import ExpertError, Services, build_backends
from maestro import parse_action
from policy import build_tokenizer
from registry import Registry

KEY_ENV = "MAESTRO_TEST_SECRET_KEY"
SECRET = "sk-live-7f3a9c1e5b2d4f6a8c0e"


def hostile(mode):
    """An expert that fails in `mode`, echoing the request headers (so the key) wherever it can."""
    def respond(request):
        echo = f"you sent {request['_headers']}"
        if mode == "echo_ok":
            return f"The value is 7. Debug: {echo}"   # a success that leaks the header
        if mode == "http_500":
            return 500, {"error": echo}, {}
        if mode == "http_401":
            return 401, {"error": "invalid key " + request["_headers"].get("Authorization", "")}, {}
        if mode == "http_429":
            return 429, echo, {"Retry-After": "0"}
        if mode == "not_json":
            return 200, "<html>" + echo, {}
        if mode == "empty":
            return {"choices": [], "debug": echo}
        if mode == "no_content":
            return {"choices": [{"message": {"content": None}}], "debug": echo}
        if mode == "cut_off":
            return 200, '{"choices": "' + echo, {"Content-Length": "100000"}
        if mode == "slow":
            time.sleep(0.5)
            return "late " + echo
        raise RuntimeError(echo)  # 'crash': the handler's exception text becomes the 500 body
    return respond


MODES = ["echo_ok", "http_500", "http_401", "http_429", "not_json", "empty", "no_content", "cut_off",
         "slow", "crash"]


def test_key_is_sent_but_never_recorded_for_any_failure(monkeypatch, caplog, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)  # urllib3 and requests debug logging included
    seen_auth = []

    def recording(respond):
        def wrapped(request):
            seen_auth.append(request["_headers"].get("Authorization"))
            return respond(request)
        return wrapped

    servers = {mode: OpenAICompatServer(recording(hostile(mode))).start() for mode in MODES}
    refused = OpenAICompatServer(hostile("crash"))
    refused.stop()  # closed port: connection refused, then circuit_open
    urls = {**{mode: s.url for mode, s in servers.items()}, "refused": refused.url}
    registry = Registry.from_dict({
        "experts": [{"name": f"E-{mode.replace('_', '-')}", "description": "x", "base_url": url,
                     "api_key_env": KEY_ENV, "timeout": 0.2, "max_retries": 1} for mode, url in urls.items()],
        "skills": [{"name": "Bar_Reader", "level": 1, "description": "x", "implementation": "toy:read_bar"}],
        "services": [{"name": "ocr", "base_url": urls["http_500"], "model": "ocr", "api_key_env": KEY_ENV,
                      "max_retries": 0}],
    })
    tokenizer = build_tokenizer(["the value is 7"] * 5, vocab_size=300)
    services = Services(registry.services)
    env = Environment(registry, build_backends(registry), services, tokenizer, obs_token_budget=512)
    image = Image.new("RGB", (8, 8), "white")
    texts, seen = [], []
    try:
        for _ in range(2):  # the second round meets the open circuit of the refused expert
            actions = [parse_action(f"<search>{name}@@Bar_Reader: value of C?</search>") for name in registry.experts] * 3
            results = env.step(actions, [Sample(str(i), "q", (image,), ("7",), "toy") for i in range(len(actions))])
            texts += [r.observation for r in results] + [repr(r) for r in results]
            seen += results
        for mode in ["http_500", "http_401", "not_json", "cut_off", "crash", "refused"]:
            backend = env.backends[f"E-{mode.replace('_', '-')}"]
            with pytest.raises(ExpertError) as info:
                backend.chat("q")
            texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
        with pytest.raises(ExpertError) as info:
            services.ocr(image, calls := [])
        texts += [str(info.value), "".join(traceback.format_exception(info.value)), repr(calls)]
    finally:
        for server in servers.values():
            server.stop()

    kinds = {c.error for r in seen for c in r.calls if c.error}
    assert {"http_5xx", "http_4xx", "http_429", "bad_response", "empty", "connection", "timeout",
            "circuit_open"} <= kinds, kinds
    assert f"Bearer {SECRET}" in seen_auth                 # the key was used
    captured = capsys.readouterr()
    texts += [json.dumps(sorted(kinds)), repr(env.backends),
              repr(registry.experts), repr(registry.services), caplog.text, captured.out, captured.err]
    leaks = [t for t in texts if SECRET in t]
    assert not leaks, leaks[0][:500]


# ---- the whole job: a short training run and an evaluation, with HTTP experts that hold the key

@pytest.fixture
def keyed_world(tmp_path, monkeypatch):
    """The toy registry with every expert behind one HTTP server that needs a key and echoes it:
    ChartSeer answers (and echoes the key in a debug line), CountBot fails with the headers in a
    500 body, GridEye rejects with a 401 naming the key, GeoMind is unreachable."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    seen_auth = []

    def respond(request):
        model = request.get("model")
        seen_auth.append((model, request["_headers"].get("Authorization")))
        if model == "ChartSeer":
            return toyworld._respond(request, toyworld.served_specialities()) + f"\n(debug: {request['_headers']})"
        return hostile("http_500" if model == "CountBot" else "http_401")(request)

    config = json.loads((toyworld.Path(toyworld.__file__).parent / "configs" / "toy.json").read_text())
    with OpenAICompatServer(respond) as server:
        gone = OpenAICompatServer(respond)
        gone.stop()
        for expert in config["experts"]:
            expert.update(api_key_env=KEY_ENV, max_retries=0, timeout=5,
                          base_url=gone.url if expert["name"] == "GeoMind" else server.url)
        path = tmp_path / "keyed_toy.json"
        path.write_text(json.dumps(config))
        yield path, seen_auth


def all_bytes(directory):
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_training_and_evaluation_with_keyed_http_experts_write_no_key(keyed_world, tmp_path, capfd, caplog):
    import eval as evaluation
    import train
    registry_path, seen_auth = keyed_world
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    train.main(["--registry", str(registry_path), "--experts", "http", "--out", str(out), "--steps", "1",
                "--sft_steps", "1", "--sft_batch", "4", "--sft_eval_every", "1", "--prompts_per_step", "4",
                "--group_size", "2", "--max_turns", "1", "--max_turn_tokens", "24", "--max_response_tokens", "64",
                "--eval_every", "0", "--num_train", "16", "--num_test", "4", "--save_every", "1", "--threads", "1"])
    evaluation.main(["--ckpt", str(out / "final"), "--registry", str(registry_path), "--experts", "http",
                     "--num_test", "4", "--baselines", "true", "--greedy", "true", "--max_response_tokens", "64",
                     "--out", str(tmp_path / "eval"), "--threads", "1"])
    # every reachable expert was called with the key: the baselines call every (expert, skill) pair
    assert {model for model, auth in seen_auth if auth == f"Bearer {SECRET}"} == {"ChartSeer", "CountBot", "GridEye"}
    assert "baselines" in json.loads((tmp_path / "eval" / "results.json").read_text())
    files = {**all_bytes(out), **all_bytes(tmp_path / "eval")}
    assert any(p.name == "metrics.jsonl" for p in files) and any("ckpt_" in str(p) for p in files)
    leaks = [str(p) for p, data in files.items() if SECRET.encode() in data]
    captured = capfd.readouterr()
    leaks += [name for name, text in [("stdout", captured.out), ("stderr", captured.err), ("logs", caplog.text)]
              if SECRET in text]
    assert not leaks, leaks
