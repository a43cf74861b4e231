"""The world seam (data.load_world), the format warm-up that any world has, and the optional plots."""
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import eval as evaluation
import plots
import toyworld
import train
from data import load_world
from environment import Environment, demonstration_turns, make_environment
from experts import ExpertError, Reply, Services
from maestro import answer_in_reply, parse_action
from rollout import trajectory_from_texts

ROOT = Path(__file__).resolve().parent.parent


def world_config(**overrides):
    return dict(train.read_config([]), num_train=8, num_test=4, **overrides)


def test_the_toy_world_is_one_call_with_its_goal_and_policy():
    world = load_world(world_config())
    assert world.registry.source.endswith("toy.json") and set(world.backends) == set(world.registry.experts)
    assert [s.family for s in world.train] == list(toyworld.FAMILIES) * 2 and len(world.test) == 4
    assert world.goal == pytest.approx(toyworld.analytic_baselines(world.registry)["goal"] + toyworld.GOAL_MARGIN)
    assert world.request_of is toyworld.request_of and world.build_policy is not None


def test_the_data_world_reads_files_calls_http_and_demonstrates_with_the_whole_question(tmp_path):
    toyworld.write_samples(toyworld.make_samples("test", 3), tmp_path / "test.jsonl")
    with toyworld.toy_server() as server:
        world = load_world(world_config(world="data", experts="http", expert_url=server.url,
                                        test_data=str(tmp_path / "test.jsonl"), train_data=""))
        assert world.goal is None and world.build_policy is None and world.request_of is None
        assert world.train == [] and [s.id for s in world.test] == [s.id for s in toyworld.make_samples("test", 3)]
        env = make_environment(world, toyworld.build_toy_policy(world.registry, "tiny")[1].tokenizer)
        (call, answer), _ = demonstration_turns(world.test[0], env, random.Random(0), world.request_of)
    action = parse_action(call)
    assert action.kind == "search" and action.query == world.test[0].question  # no world-specific request
    assert parse_action(answer).kind == "answer"


class FickleExpert:
    """An expert that says something new at every call and wraps it in answer tags (an empty block
    when `mute`), and fails (HTTP 503) while `down` names it: the warm-up must show the reply it
    copies and draw past failures and replies with no answer."""

    def __init__(self, name, down, mute=False):
        self.name, self.down, self.mute, self.calls = name, down, mute, 0

    def chat(self, text, images=(), system=None, **generation):
        self.calls += 1
        if self.name in self.down:
            raise ExpertError("http_503", self.name, "service unavailable")
        return Reply(f"Looked twice.\n<answer>{'' if self.mute else self.calls}</answer>", 1, 1, 0.0)


def test_a_demonstration_calls_once_shows_the_reply_it_copies_and_draws_past_failures():
    world = load_world(world_config())
    tokenizer = toyworld.build_toy_policy(world.registry, "tiny")[1].tokenizer
    names = sorted(world.registry.experts)
    down = set(names[:-2])  # every expert but two fails, and one of those two has nothing to say
    experts = {name: FickleExpert(name, down, mute=name == names[-2]) for name in names}
    env = Environment(world.registry, experts, Services({}), tokenizer)
    sample, rng = world.train[0], random.Random(0)
    turns, results = demonstration_turns(sample, env, rng, world.request_of)
    up = experts[names[-1]]
    assert up.calls == 1 and sum(e.calls for e in experts.values()) > 1  # drawn again past failures
    assert all(e.calls <= 1 for e in experts.values())  # and never again with an expert that failed
    assert parse_action(turns[1]).answer == "1" and not results[0].error  # the tags' inside, not the tags
    assert answer_in_reply("Reasoning.\n<answer>\n 4 \n</answer>\nThanks") == "4"  # raw tags (upstream's observations)
    trajectory = trajectory_from_texts(tokenizer, sample, env, turns, results)
    assert up.calls == 1  # the trajectory shows the very reply the answer copies
    assert "1" in trajectory.turns[0].result.observation and trajectory.stop_reason == "answered"
    down.add(names[-1])
    with pytest.raises(RuntimeError, match=r"every advertised expert failed a demonstration call for sample .*; the last: "):
        demonstration_turns(sample, env, rng, world.request_of)
    # a request that makes the call itself invalid is no expert's fault: it stops at once, naming why
    with pytest.raises(ValueError, match=r"the demonstration call for sample .* is invalid \(nested_tag\)"):
        demonstration_turns(replace(sample, question="Which word follows <answer> on the sign?"), env, rng)


@pytest.mark.parametrize("overrides, message", [
    (dict(world="data", experts="toy"), "in-process toy experts belong to --world toy"),
    (dict(world="data", experts="http", test_data=""), "the data world needs test files"),
    (dict(world="mars"), "expected toy or data"),
])
def test_a_bad_world_config_is_a_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_world(world_config(**overrides))


def test_train_without_training_samples_exits_with_a_message(tmp_path, capsys):
    toyworld.write_samples(toyworld.make_samples("test", 2), tmp_path / "test.jsonl")
    with pytest.raises(SystemExit, match="this world has no training samples"):
        train.main(["--world", "data", "--train_data", "", "--test_data", str(tmp_path / "test.jsonl"),
                    "--expert_url", "http://127.0.0.1:9/v1", "--registry", str(ROOT / "configs" / "toy.json"),
                    "--out", str(tmp_path / "out")])


def test_plots_are_written_with_matplotlib_and_skipped_without(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    results = {"accuracy": 0.5, "calls": {"ChartSeer": {"Bar_Reader": 3}, "GeoMind": {"Angle_Solver": 1}}}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"phase": "grpo", "step": 1, "accuracy": 0.1, "route/toy_bar/max_pair_share": 0.2},
        {"phase": "eval", "step": 10, "accuracy": 0.3, "format_valid_rate": 1.0, "route/toy_bar/max_pair_share": 0.4},
        {"phase": "eval", "step": 20, "accuracy": 0.6, "format_valid_rate": 1.0, "route/toy_bar/max_pair_share": 0.9}]))
    for draw, source in ((plots.routing_heatmap, results), (plots.learning_curve, metrics)):
        path = draw(source, tmp_path / f"{draw.__name__}.png")
        assert path is not None and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert plots.routing_heatmap(results, tmp_path / "none.png") is None
    assert plots.learning_curve(metrics, tmp_path / "none2.png") is None
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "none2.png").exists()
    evaluation.write_results({**evaluation.summarize([], load_world(world_config()).registry)}, tmp_path / "eval")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json", "results.md"]
