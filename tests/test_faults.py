"""Faults in experts: real HTTP servers on 127.0.0.1 that misbehave on command, driven through
Environment.step (one step = one rollout batch turn) with the real skills and HTTP client.

Under every fault the batch completes, each failed call becomes an error observation naming the
expert and the failure, retries stay within the configured count, the turn's wall time stays
within the bound computed from the configured timeout / retries / backoff (plus generous slack:
bounds, not timings), the failure is counted, and nothing leaks over 200 batches.
"""
import os
import socket
import threading
import time

import pytest
from PIL import Image
from collections import Counter

from data import Sample
from environment import Environment
from chatserver import OpenAICompatServer
from experts import OpenAIChatClient, Services
from maestro import format_call, parse_action
from policy import build_tokenizer
from registry import Registry

SLACK = 2.0  # seconds of scheduling slack on a loaded 2-core machine; bounds below are ~1-3 s


class FaultyExpert:
    """respond() for OpenAICompatServer whose behaviour is switched by setting .fault."""

    def __init__(self, fault="ok", retry_after="1"):
        self.fault, self.retry_after = fault, retry_after
        self.times, self.lock = [], threading.Lock()
        self.release = threading.Event()  # set to end 'slow' replies early (teardown)

    def __call__(self, request):
        with self.lock:
            self.times.append(time.monotonic())
        fault = self.fault
        if fault == "http_500":
            return 500, {"error": "model worker crashed"}, {}
        if fault == "http_429":
            return 429, {"error": "rate limited"}, {"Retry-After": self.retry_after}
        if fault == "slow":
            self.release.wait(10.0)
            return "a reply that comes too late"
        if fault == "truncated_json":  # framing intact, JSON cut off
            return 200, '{"choices": [{"message": {"role": "assistant", "content": "There are', {}
        if fault == "cut_off":  # announces 4096 bytes, sends a few, closes the connection
            return 200, '{"choices": [{"mess', {"Content-Length": "4096"}
        if fault == "not_json":
            return 200, "<html><body>502 Bad Gateway</body></html>", {}
        if fault == "empty_choices":
            return {"id": "chatcmpl-0", "object": "chat.completion", "choices": []}
        if fault == "huge":
            return "HEAD " + "many words " * 400_000 + "TAIL"  # 4.4 MB of content
        return "There are 3 cubes."


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def client(name, url, **kwargs):
    kwargs = {"timeout": 5.0, "max_retries": 2, "backoff": 0.05, **kwargs}
    return OpenAIChatClient(name, url, "served", **kwargs)


def make_env(tokenizer, clients, max_parallel=4, budget=1024):
    """An Environment over real HTTP clients: one expert per client, one toy skill."""
    registry = Registry.from_dict({
        "experts": [{"name": name, "description": "test expert", "base_url": c.url.removesuffix("/chat/completions")}
                    for name, c in clients.items()],
        "skills": [{"name": "Bar_Reader", "level": 1, "description": "reads a bar",
                    "implementation": "toy:read_bar"}],
    })
    return Environment(registry, clients, Services({}), tokenizer, obs_token_budget=budget,
                       max_parallel=max_parallel)


def search(expert):
    return parse_action(f"<search>{expert}@@Bar_Reader: what is the value of bar C?</search>")


def sample(i=0):
    return Sample(id=f"s{i}", question="What is bar C?", images=(Image.new("RGB", (16, 16), "red"),),
                  ground_truths=("3",), data_source="toy")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["There are 3 cubes; the value of bar C is 7"] * 10, vocab_size=300)


def n_tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


# fault -> (ExpertError kind, retried?)
FAULTS = {
    "refused": ("connection", True),
    "http_500": ("http_5xx", True),
    "http_429": ("http_429", True),
    "slow": ("timeout", True),
    "cut_off": ("connection", True),
    "truncated_json": ("bad_response", False),
    "not_json": ("bad_response", False),
    "empty_choices": ("empty", False),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_becomes_a_bounded_counted_error_observation(fault, tokenizer):
    kind, retried = FAULTS[fault]
    timeout, retries, backoff, retry_after = 0.3, 2, 0.05, 1.0
    expert = FaultyExpert(fault, retry_after=str(int(retry_after)))
    server = OpenAICompatServer(expert)
    if fault != "refused":
        server.start()
    else:
        server.stop()  # bound but never served, now closed: nothing listens on its port
    batch = 4
    api = client("Faulty", server.url, timeout=timeout, max_retries=retries, backoff=backoff,
                 breaker_threshold=100)  # this test is about one call's retries, not the breaker
    env = make_env(tokenizer, {"Faulty": api})
    try:
        start = time.monotonic()
        results = env.step([search("Faulty")] * batch, [sample(i) for i in range(batch)])
        elapsed = time.monotonic() - start
    finally:
        expert.release.set()
        server.stop()

    attempts = retries + 1 if retried else 1
    waits = [retry_after if fault == "http_429" else backoff * 2 ** k for k in range(attempts - 1)]
    per_attempt = timeout if fault == "slow" else 0.0
    assert elapsed <= attempts * per_attempt + sum(waits) + SLACK, elapsed   # concurrent calls: one call's bound
    assert elapsed >= sum(waits) * 0.9                                      # the backoff was honoured
    if fault != "refused":
        assert len(expert.times) == batch * attempts                       # retries within the configured count
    for result in results:
        assert result.error == "expert_error" and result.expert == "Faulty"
        assert f"The call to Faulty failed ({kind})" in result.observation  # names the expert and the failure
        assert n_tokens(tokenizer, result.observation) <= 1024
        assert [(c.name, c.error) for c in result.calls] == [("Faulty", kind)]   # the Call record
    assert Counter(r.error for r in results) == {"expert_error": batch}
    assert Counter(c.error for r in results for c in r.calls) == {kind: batch}


def test_huge_reply_is_cut_to_the_budget_quickly(tokenizer):
    with OpenAICompatServer(FaultyExpert("huge")) as server:
        env = make_env(tokenizer, {"Verbose": client("Verbose", server.url)})
        start = time.monotonic()
        results = env.step([search("Verbose")] * 2, [sample(0), sample(1)])
        elapsed = time.monotonic() - start
    for result in results:
        assert result.error == ""
        assert n_tokens(tokenizer, result.observation) <= 1024
        assert result.observation.startswith("<information>HEAD many")
        assert result.observation.endswith("TAIL</information>") and "truncated" in result.observation
    assert elapsed < 10.0, elapsed  # tokenizing all 4.4 MB with this 300-token vocabulary takes ~40 s


def test_one_dead_or_slow_expert_does_not_stall_the_others(tokenizer):
    """8 calls to an expert that never answers in time and 8 to one that refuses connections come
    first in the batch; the 8 calls to a healthy expert must not queue behind them."""
    slow, healthy = FaultyExpert("slow"), FaultyExpert("ok")
    slow_timeout = 1.0
    with OpenAICompatServer(slow) as slow_server, OpenAICompatServer(healthy) as healthy_server:
        env = make_env(tokenizer, {
            "Slow": client("Slow", slow_server.url, timeout=slow_timeout, max_retries=0),
            "Dead": client("Dead", closed_port_url(), max_retries=2, backoff=0.3, breaker_threshold=3),
            "Healthy": client("Healthy", healthy_server.url),
        }, max_parallel=4)
        actions = [search("Slow")] * 8 + [search("Dead")] * 8 + [search("Healthy")] * 8
        try:
            start = time.monotonic()
            results = env.step(actions, [sample(i) for i in range(len(actions))])
            elapsed = time.monotonic() - start
        finally:
            slow.release.set()
    assert len(healthy.times) == 8
    assert max(healthy.times) - start < slow_timeout  # served before a single slow call timed out
    assert [r.error for r in results[16:]] == [""] * 8
    assert all(r.error == "expert_error" for r in results[:16])
    # 8 slow calls, 4 at a time: two rounds of one timeout each; dead calls are bounded by the breaker
    assert elapsed <= 2 * slow_timeout + 0.3 * 3 + SLACK, elapsed
    dead = [r.observation for r in results[8:16]]
    assert sum("(connection)" in o for o in dead) >= 3
    assert any("(circuit_open)" in o and "failing fast" in o for o in dead)


def test_server_that_dies_mid_run_and_comes_back(tokenizer):
    expert = FaultyExpert("ok")
    server = OpenAICompatServer(expert).start()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    cooldown = 0.5
    api = client("Phoenix", server.url, max_retries=1, backoff=0.01, breaker_threshold=3,
                 breaker_cooldown=cooldown)
    env = make_env(tokenizer, {"Phoenix": api})
    batch = [search("Phoenix")] * 4, [sample(i) for i in range(4)]
    try:
        assert [r.error for r in env.step(*batch)] == [""] * 4
        server.stop()                                             # dies
        down = env.step(*batch)
        down_kinds = [r.observation.split("Phoenix failed (")[1].split(")")[0] for r in down]
        assert down_kinds.count("connection") >= 3 and set(down_kinds) <= {"connection", "circuit_open"}
        start = time.monotonic()
        fast = env.step(*batch)                                   # the breaker is open: fail fast
        assert time.monotonic() - start < cooldown
        assert all("Phoenix failed (circuit_open)" in r.observation for r in fast)
        server = OpenAICompatServer(expert, port=port).start()   # comes back on the same port
        served_before = len(expert.times)
        time.sleep(cooldown)
        assert [r.error for r in env.step(*batch)] == [""] * 4    # and is used again after the cooldown
        assert len(expert.times) == served_before + 4
    finally:
        server.stop()
    failed = Counter(c.error for r in down + fast for c in r.calls)
    assert failed["connection"] + failed["circuit_open"] == 8 and sum(failed.values()) == 8


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def steady(measure, seconds=2.0):
    """measure() once it has not changed over three polls (handler threads winding down)."""
    deadline, readings = time.monotonic() + seconds, [measure()]
    while time.monotonic() < deadline and (len(readings) < 3 or len(set(readings[-3:])) > 1):
        time.sleep(0.05)
        readings.append(measure())
    return readings[-1]


def settle(measure, limit, seconds=5.0):
    """measure() once it is <= limit, polling for up to `seconds` (server threads finishing)."""
    deadline = time.monotonic() + seconds
    while measure() > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return measure()


def test_no_thread_or_socket_leaks_over_200_faulty_batches(tokenizer):
    faults = ["ok", "http_500", "http_429", "cut_off", "truncated_json", "not_json", "empty_choices", "slow"]
    experts = {fault: FaultyExpert(fault) for fault in faults}
    servers = {fault: OpenAICompatServer(expert).start() for fault, expert in experts.items()}
    clients = {f"E_{fault}": client(f"E_{fault}", server.url, max_retries=1, backoff=0.001,
                                    max_delay=0.001, timeout=0.1)
               for fault, server in servers.items()}
    clients["E_refused"] = client("E_refused", closed_port_url(), max_retries=1, backoff=0.001)
    env = make_env(tokenizer, clients, max_parallel=4)
    names = sorted(clients)
    try:
        fast, seen = [name for name in names if name != "E_slow"], []

        def batch(i):
            """Calls to 4 of the 8 fast experts in turn (the slow one every 20th batch), plus policy mistakes."""
            actions = [search(fast[(i + k) % len(fast)]) for k in range(4)] + [search("E_slow")] * (i % 20 == 0)
            actions += [parse_action("<search>Nobody@@Bar_Reader: q</search>"), parse_action("no action"),
                        parse_action("<answer>3</answer>")]
            results = env.step(actions, [sample(j) for j in range(len(actions))])
            seen.extend(results)
            return results

        # warm up: sessions, pools and imports exist before the baseline
        failing = sum(r.error == "expert_error" for r in batch(0))
        experts["slow"].release.set()
        threads, fds = steady(threading.active_count), steady(open_fds)
        experts["slow"].release.clear()
        for i in range(1, 201):
            results = batch(i)
            assert len(results) == 4 + (i % 20 == 0) + 3
            failing += sum(r.error == "expert_error" for r in results)
        experts["slow"].release.set()  # let the slow handlers (whose clients gave up) finish
        assert settle(threading.active_count, threads + 2) <= threads + 2
        assert settle(open_fds, fds + 4) <= fds + 4
    finally:
        for expert in experts.values():
            expert.release.set()
        for server in servers.values():
            server.stop()
    errors = Counter(r.error for r in seen)
    assert errors["expert_error"] == failing
    assert errors["unknown_model"] == 201 and errors["no_action"] == 201
    # every expert failure names its kind in exactly one failed Call
    assert sum(1 for r in seen if r.error == "expert_error" for c in r.calls if c.error) == failing


def test_rollout_of_a_tiny_policy_against_faulty_experts():
    """The real rollout engine with the toy policy and the toy registry, where ChartSeer answers
    500, CountBot refuses connections, GridEye is slower than its timeout and GeoMind is the real
    toy expert over HTTP. Teacher-forced calls (the rollout's own turn execution) show each failure
    as an observation in the trajectory; sampled rollouts of the untrained policy complete."""
    import json as json_

    import toyworld
    from experts import build_backends
    from rollout import RolloutConfig, rollout, trajectory_from_texts

    config = json_.loads((toyworld.Path(toyworld.__file__).parent / "configs" / "toy.json").read_text())
    crashing, slow = FaultyExpert("http_500"), FaultyExpert("slow")
    with OpenAICompatServer(crashing) as crash_server, OpenAICompatServer(slow) as slow_server, \
            toyworld.toy_server() as toy_server:
        urls = {"ChartSeer": crash_server.url, "CountBot": closed_port_url(), "GridEye": slow_server.url,
                "GeoMind": toy_server.url}
        for expert in config["experts"]:
            expert.update(base_url=urls[expert["name"]], timeout=0.3, max_retries=0)
        registry = Registry.from_dict(config)
        model, processor = toyworld.build_toy_policy(registry, "tiny", seed=0)
        env = Environment(registry, build_backends(registry), Services({}), processor.tokenizer)
        samples = toyworld.make_samples("test", 2, seed=0)
        kinds = set()
        try:
            expected = {"ChartSeer": "http_5xx", "CountBot": "connection", "GridEye": "timeout", "GeoMind": ""}
            for expert, kind in expected.items():
                turns = [format_call(expert, "Angle_Solver", samples[0].question), "<answer> 1 </answer>"]
                start = time.monotonic()
                traj = trajectory_from_texts(processor, samples[0], env, turns)
                assert time.monotonic() - start < 0.3 + SLACK
                result = traj.turns[0].result
                kinds |= {c.error for c in result.calls if c.error}
                assert result.error == ("expert_error" if kind else ""), result.observation
                if kind:
                    assert f"The call to {expert} failed ({kind})" in result.observation
                # the observation is in the response, masked out of the loss
                observation_ids = processor.tokenizer(result.observation, add_special_tokens=False)["input_ids"]
                text = processor.tokenizer.decode(
                    [t for t, m in zip(traj.response_ids, traj.loss_mask) if m == 0], skip_special_tokens=False)
                assert result.observation in text and len(observation_ids) > 0
                assert traj.stop_reason == "answered"
            import torch
            torch.manual_seed(0)
            cfg = RolloutConfig(group_size=2, max_turns=2, max_turn_tokens=24, max_response_tokens=96)
            trajectories = rollout(model, processor, samples, env, cfg)
            assert len(trajectories) == 4 and all(t.stop_reason for t in trajectories)
        finally:
            slow.release.set()
    assert kinds == {"http_5xx", "connection", "timeout"}
