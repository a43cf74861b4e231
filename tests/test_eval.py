"""eval.py: the same numbers over HTTP as in-process, every reported field, baselines that match the
toy world's closed form, a registry swap without retraining, and a fast offline failure for Hub ids."""

import json
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

import eval as evaluation
import toyworld
from environment import Environment, demonstration_turns
from experts import Services
from maestro import Action, format_answer, format_call, parse_action, reply_of
from policy import build_prompt, load_policy, save_policy, tokenizer_of
from registry import Registry
from rollout import RolloutConfig, trajectory_from_texts
from scoring import RewardConfig

ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = ROOT / "configs" / "toy.json"
QUICK = ["--num_test", "16", "--greedy", "true", "--max_turns", "1", "--max_turn_tokens", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained toy policy saved like a real checkpoint: its greedy rollouts are deterministic."""
    model, processor = toyworld.build_toy_policy(Registry.load(TOY_CONFIG), seed=0)
    path = tmp_path_factory.mktemp("toy_policy")
    save_policy(model, processor, path)
    return path


def comparable(results):
    keep = ("accuracy", "format_valid_rate", "mean_turns", "by_source", "calls", "skill_paths", "errors",
            "stop_reasons", "baselines")
    return {key: results[key] for key in keep}


def test_http_experts_and_jsonl_files_give_the_same_results_as_in_process(checkpoint, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. transformers' deprecated past_key_values
        local = evaluation.main(["--ckpt", str(checkpoint), *QUICK, "--baselines", "true", "--experts", "toy",
                                 "--out", str(tmp_path / "local")])
    assert local["config"]["device"] == "cpu" and local["config"]["dtype"] == "float32"  # the CPU defaults
    # --world toy applies configs/eval_toy.json: the toy job's own evaluation settings
    assert local["config"]["rollout"]["max_response_tokens"] == 256 and local["config"]["experts"] == "toy"
    for part in (local, *local["by_source"].values()):  # both scorers, side by side
        assert {"accuracy", "accuracy_upstream", "scorers_disagree"} <= set(part)
    assert "accuracy (upstream's scorer)" in (tmp_path / "local" / "results.md").read_text()
    with toyworld.toy_server() as server:
        data = json.loads(TOY_CONFIG.read_text())
        for expert in data["experts"]:
            expert["base_url"] = server.url
        (tmp_path / "toy_http.json").write_text(json.dumps(data))
        samples = toyworld.make_samples("test", 16)  # the default split, now read back from two files
        toyworld.write_samples(samples[:8], tmp_path / "data" / "first.jsonl")
        toyworld.write_samples(samples[8:], tmp_path / "data" / "second.jsonl")
        remote = evaluation.main(["--ckpt", str(checkpoint), *QUICK, "--baselines", "true", "--experts", "http",
                                  "--registry", str(tmp_path / "toy_http.json"), "--out", str(tmp_path / "http"),
                                  "--world", "data", "--test_data",
                                  f"{tmp_path / 'data' / 'first.jsonl'},{tmp_path / 'data' / 'second.jsonl'}"])
    assert comparable(local) == comparable(remote)
    assert remote["config"]["experts"] == "http" and local["config"]["experts"] == "toy"

    written = json.loads((tmp_path / "local" / "results.json").read_text())
    for key in ("accuracy", "format_valid_rate"):
        assert 0.0 <= written[key] <= 1.0
    assert set(written["by_source"]) == {f"toy_{f}" for f in toyworld.FAMILIES}
    assert all("accuracy" in s and "max_pair_share" in s for s in written["by_source"].values())
    assert isinstance(written["calls"], dict) and written["checkpoint"] == str(checkpoint)
    for key in ("errors", "stop_reasons", "latency", "tokens", "config"):
        assert key in written
    baselines = written["baselines"]
    experts, skills = ["ChartSeer", "CountBot", "GridEye", "GeoMind"], ["Bar_Reader", "Shape_Counter",
                                                                         "Grid_Router", "Angle_Solver"]
    assert {e: sorted(row) for e, row in baselines["pairs"].items()} == {e: sorted(skills) for e in experts}
    mean_pair = sum(sum(row.values()) for row in baselines["pairs"].values()) / 16
    assert baselines["random_pair"] == pytest.approx(mean_pair)
    assert baselines["best_fixed_pair"] == max(a for row in baselines["pairs"].values() for a in row.values())
    assert 0.0 <= baselines["oracle"] <= 1.0 and baselines["oracle_coverage"] == 1.0
    markdown = (tmp_path / "local" / "results.md").read_text()
    assert "| **overall** | 16 |" in markdown and "oracle" in markdown


def test_summary_of_teacher_forced_trajectories(checkpoint):
    """The routing table, paths, errors, accuracy and format of known trajectories."""
    registry = Registry.load(TOY_CONFIG)
    model, processor = load_policy(checkpoint)
    env = Environment(registry, toyworld.toy_backends(registry), Services({}), tokenizer_of(processor))
    samples = toyworld.make_samples("test", 12)
    trajectories, correct = [], 0
    for i, sample in enumerate(samples):
        expert, skill = registry.oracle[sample.family] if i < 8 else ("Nobody", "Bar_Reader")
        call = format_call(expert, skill, sample.question)
        [result] = env.step([parse_action(call)], [sample])
        reply = reply_of(result.observation)
        correct += i < 8 and reply == sample.ground_truths[0]
        trajectories.append(trajectory_from_texts(processor, sample, env, [call, format_answer(reply)]))
    records = [evaluation.record(t, RewardConfig(), env) for t in trajectories]
    results = evaluation.summarize(records, registry, seconds=1.2)
    assert results["accuracy"] == pytest.approx(correct / 12) and correct >= 6
    assert results["routing_accuracy"] == 1.0  # the 8 calls that resolved went to the oracle pair
    assert results["format_valid_rate"] == pytest.approx(8 / 12)
    assert results["calls"] == {"ChartSeer": {"Bar_Reader": 2}, "CountBot": {"Shape_Counter": 2},
                                "GridEye": {"Grid_Router": 2}, "GeoMind": {"Angle_Solver": 2}}
    grid_paths = [p for p in results["skill_paths"] if p.startswith("Grid_Router > ")]
    assert sum(results["skill_paths"][p] for p in grid_paths) == 2
    assert results["errors"] == {"unknown_model": 4}
    assert results["by_source"]["toy_bar"]["max_pair_share"] == 1.0  # only the oracle pair was resolved
    assert results["mean_turns"] == 2 and results["latency"]["per_sample_s"] == pytest.approx(0.1)
    assert results["tokens"]["expert_prompt"] > 0 and set(results["latency"]["per_expert_call_s"]) == set(registry.experts)
    # upstream scored the response cut to its first 4096 tokens: an answer after the cut scores 0 there
    right = next(t for t, r in zip(trajectories, records) if r["correct_strict"] == 1)
    right = replace(right, sample=replace(right.sample, data_source="chartqa"))  # a source upstream scored
    filler = tokenizer_of(processor)(" x", add_special_tokens=False)["input_ids"]
    late = replace(right, response_ids=filler * 4096 + right.response_ids)
    assert [evaluation.record(t, RewardConfig(), env)["correct_upstream"] for t in (right, late)] == [1, 0]


def test_baselines_through_the_environment_match_the_closed_form(checkpoint):
    registry = Registry.load(TOY_CONFIG)
    model, processor = load_policy(checkpoint)
    env = Environment(registry, toyworld.toy_backends(registry), Services({}), tokenizer_of(processor))
    n = 400
    measured = evaluation.run_baselines(toyworld.make_samples("test", n, seed=5), env, registry)
    analytic = toyworld.analytic_baselines(registry)

    def four_standard_errors(p):  # hashed expert decisions are independent draws per question
        return 4 * (p * (1 - p) / n) ** 0.5

    assert measured["oracle"] == pytest.approx(analytic["oracle"], abs=four_standard_errors(0.95))
    assert measured["random_pair"] == pytest.approx(analytic["random_pair"], abs=four_standard_errors(0.2) / 2)
    for expert, row in analytic["pairs"].items():
        for skill, p in row.items():
            assert measured["pairs"][expert][skill] == pytest.approx(p, abs=four_standard_errors(p)), (expert, skill)


class ReasoningExpert:
    """A toy expert that reasons on lines of its own before its answer, alone on the last line, as
    every paper skill asks its expert to."""

    def __init__(self, toy_expert):
        self.name, self.toy_expert = toy_expert.name, toy_expert

    def chat(self, text, images=(), system=None, **generation):
        reply = self.toy_expert.chat(text, images, system, **generation)
        return replace(reply, text=f"<think>the question first</think>Reading it.\nChecking twice.\n\n{reply.text}\n")


def test_baselines_and_demonstrations_answer_with_the_last_line_of_a_reasoned_reply(checkpoint):
    registry = Registry.load(TOY_CONFIG)
    tokenizer = tokenizer_of(load_policy(checkpoint)[1])
    backends = toyworld.toy_backends(registry)
    plain = Environment(registry, backends, Services({}), tokenizer)
    reasoned = Environment(registry, {name: ReasoningExpert(b) for name, b in backends.items()}, Services({}), tokenizer)
    samples = toyworld.make_samples("test", 40, seed=3)
    measured = evaluation.run_baselines(samples, reasoned, registry)
    assert measured == evaluation.run_baselines(samples, plain, registry) and measured["oracle"] > 0.5
    for sample in samples[:4]:  # the same random pair each time; the answer is the answer line alone
        assert demonstration_turns(sample, reasoned, random.Random(7))[0] == demonstration_turns(sample, plain, random.Random(7))[0]


def test_an_extra_expert_and_skill_are_prompted_and_callable_without_retraining(checkpoint):
    data = json.loads(TOY_CONFIG.read_text())
    data["experts"].append({"name": "ChartSeerPro", "description": "a newer chart reader",
                            "base_url": "http://127.0.0.1:8765/v1"})
    data["skills"].append({"name": "Bar_Reader_Pro", "level": 1, "description": "bar values, carefully",
                           "implementation": "toy:read_bar"})
    registry = Registry.from_dict(data)
    model, processor = load_policy(checkpoint)
    sample = toyworld.make_samples("test", 1)[0]
    prompt_text = tokenizer_of(processor).decode(build_prompt(processor, registry, sample)["input_ids"][0])
    assert "ChartSeerPro" in prompt_text and "Bar_Reader_Pro" in prompt_text

    env = Environment(registry, toyworld.toy_backends(registry), Services({}), tokenizer_of(processor))
    [result] = env.step([Action(kind="search", model="ChartSeerPro", skill="Bar_Reader_Pro", query=sample.question)],
                        [sample])
    assert not result.error and (result.expert, result.skill) == ("ChartSeerPro", "Bar_Reader_Pro")
    assert reply_of(result.observation) in toyworld.ANSWER_SPACE["bar"]

    samples = toyworld.make_samples("test", 8)
    cfg = RolloutConfig(max_turns=1, max_turn_tokens=8, greedy=True)
    results = evaluation.evaluate(model, processor, samples, env, cfg, baselines=True, registry=registry)
    assert results["baselines"]["pairs"]["ChartSeerPro"].keys() >= {"Bar_Reader", "Bar_Reader_Pro"}
    assert toyworld.analytic_baselines(registry)["pairs"]["ChartSeerPro"]["Bar_Reader_Pro"] == pytest.approx(0.125)


def test_a_hub_id_offline_fails_fast_naming_the_id():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "eval.py", "--ckpt", "Jinyang23/Maestro-4B"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "Jinyang23/Maestro-4B" in done.stderr and "local checkpoint directory or go online" in done.stderr
    assert elapsed < 60, f"took {elapsed:.1f}s (mostly importing torch and transformers)"


def test_paper_registry_upstream_protocol_against_loopback_experts(tiny_dir, tmp_path):
    """The acceptance command of the paper evaluation: configs/paper.json, upstream's example val
    row, --protocol upstream, --experts http, every expert and service a loopback server on the
    registry's own port; both accuracies reported."""
    pytest.importorskip("pyarrow")
    data = ROOT.parent / "shared" / "upstream-example" / "val_data_example.parquet"
    if not data.is_file():
        pytest.skip(f"upstream example rows not present at {data}")
    from chatserver import OpenAICompatServer
    registry = json.loads((ROOT / "configs" / "paper.json").read_text())
    ports = sorted({int(entry["base_url"].rsplit(":", 1)[1].split("/")[0])
                    for entry in registry["experts"] + registry["services"]})
    requests = []

    def respond(request):
        requests.append(request["model"])
        return "Tania Vicenzino"

    servers = []
    try:
        for port in ports:
            try:
                servers.append(OpenAICompatServer(respond, port=port).start())
            except OSError as error:
                pytest.skip(f"port {port} of configs/paper.json is taken on this machine: {error}")
        results = evaluation.main(["--ckpt", str(tiny_dir), "--registry", str(ROOT / "configs" / "paper.json"),
                                   "--world", "data", "--test_data", str(data), "--protocol", "upstream",
                                   "--experts", "http", "--greedy", "true", "--max_turn_tokens", "8",
                                   "--baselines", "true", "--out", str(tmp_path)])
    finally:
        for server in servers:
            server.stop()
    assert results["config"]["protocol"] == "upstream" and results["config"]["prompt"] == "stored"
    assert results["questions"] == 1 and {"accuracy", "accuracy_upstream", "scorers_disagree"} <= set(results)
    assert results["baselines"]["best_fixed_pair"] == 1.0  # every pair's reply names the answer
    assert {"Chart-R1", "GLM-4.6V-Flash", "qwen3-VL-8B-Instruct"} <= set(requests)
