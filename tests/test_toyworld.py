"""The toy world: deterministic disjoint splits, exact pixel readers, toy experts whose measured
accuracy matches the closed form, and the same replies in-process and over HTTP."""

import hashlib
import json
import random
from pathlib import Path

import pytest

import toyworld
from experts import Services, build_backends
from registry import Registry
from skills import SkillContext, run_skill

TOY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.json"


@pytest.fixture(scope="module")
def registry():
    return Registry.load(TOY_CONFIG)


def content(sample):
    return (sample.question, hashlib.sha256(sample.images[0].tobytes()).hexdigest())


def test_same_seed_same_samples_and_shorter_is_prefix():
    first, again, longer = (toyworld.make_samples("test", n, seed=3) for n in (24, 24, 40))
    assert [content(s) for s in first] == [content(s) for s in again] == [content(s) for s in longer[:24]]
    assert [s.ground_truths for s in first] == [s.ground_truths for s in again]
    other_seed = toyworld.make_samples("test", 24, seed=4)
    assert [content(s) for s in other_seed] != [content(s) for s in first]
    assert [s.family for s in first[:8]] == list(toyworld.FAMILIES) * 2
    assert all(s.data_source == f"toy_{s.family}" and s.images[0].size == (64, 64) for s in first)


def test_splits_are_disjoint_and_items_unique():
    train = {content(s) for s in toyworld.make_samples("train", 2000, seed=0)}
    test = [content(s) for s in toyworld.make_samples("test", 400, seed=0)]
    test_other_seed = {content(s) for s in toyworld.make_samples("test", 400, seed=7)}
    assert len(train) == 2000 and len(set(test)) == 400
    assert not train & set(test) and not train & test_other_seed
    with pytest.raises(ValueError, match="'train' or 'test'"):
        toyworld.make_samples("val", 1)


def test_pixel_readers_are_exact_on_200_samples_per_family():
    samples = toyworld.make_samples("train", 1000, seed=11, families=(*toyworld.FAMILIES, toyworld.UNTRAINED_FAMILY))
    kinds_seen = set()
    for sample in samples:
        kind, slots = toyworld.parse_question(sample.question)
        kinds_seen.add(kind)
        assert toyworld.FAMILY_OF_KIND[kind] == sample.family, sample.question
        assert toyworld.read_answer(kind, slots, sample.images[0]) == sample.ground_truths[0], sample.question
        request = toyworld.request_of(sample.question)  # the demonstrations' short input means the same
        assert toyworld.parse_question(request) == (kind, slots) and len(request) < len(sample.question), request
    assert kinds_seen == set(toyworld.FAMILY_OF_KIND)
    assert toyworld.request_of("hello there") == "hello there"


def test_reader_functions_directly():
    image = toyworld.render("bar", {"values": [1, 50, 17, 9, 33], "colour": 2})
    assert [toyworld.read_bar(image, label) for label in "ABCDE"] == [1, 50, 17, 9, 33]
    shapes = [[0, "red", "circle"], [5, "red", "circle"], [6, "red", "square"], [15, "blue", "triangle"]]
    image = toyworld.render("count", {"shapes": shapes})
    assert sorted(toyworld.read_shapes(image)) == sorted((c, s) for _, c, s in shapes)
    assert toyworld.count_shapes(image, "red", "circle") == 2
    cells = [["red", "green", "blue"], ["yellow", "purple", "orange"]]
    image = toyworld.render("grid_cell", {"cells": cells})
    assert toyworld.grid_shape(image) == (2, 3)
    assert [toyworld.read_cell_colour(image, r, c) for r in (1, 2) for c in (1, 2, 3)] == sum(cells, [])
    assert toyworld.read_cell_colour(image, 3, 1) is None


def test_expert_reply_needs_a_question_and_a_wrong_reply_stays_in_the_answer_space():
    sample = toyworld.make_samples("test", 1)[0]
    assert toyworld.expert_reply("bar", "Task: read_bar\nRequest: hello", sample.images) == "unknown"
    assert toyworld.expert_reply("bar", f"Task: read_bar\nRequest: {sample.question}", ()) == "unknown"
    replies = {toyworld.expert_reply("count", f"Task: third_angle\nRequest: {sample.question} #{i}",
                                     sample.images) for i in range(60)}
    assert replies <= set(toyworld.ANSWER_SPACE["bar"]) and len(replies) > 10


def run_pair(registry, backends, expert, skill, sample) -> str:
    ctx = SkillContext(registry, registry.skills[skill], backends[expert], Services({}),
                       sample.question, sample.images)
    return run_skill(ctx).text


def test_measured_accuracy_of_every_pair_and_the_oracle_matches_the_closed_form(registry):
    analytic = toyworld.analytic_baselines(registry)
    assert analytic["random_pair"] == pytest.approx(0.209375)
    assert analytic["best_fixed_pair"] == pytest.approx(0.3125)
    assert analytic["oracle"] == pytest.approx(0.95)
    assert analytic["goal"] == pytest.approx(0.855)
    backends = toyworld.toy_backends(registry)
    samples = toyworld.make_samples("test", 400, seed=1)
    measured = {}
    for expert, row in analytic["pairs"].items():
        for skill in row:
            correct = [run_pair(registry, backends, expert, skill, s) == s.ground_truths[0] for s in samples]
            measured[expert, skill] = sum(correct) / len(correct)

    def four_standard_errors(p):  # hashed expert decisions are independent draws per question
        return 4 * (p * (1 - p) / len(samples)) ** 0.5

    for (expert, skill), accuracy in measured.items():
        p = analytic["pairs"][expert][skill]
        assert accuracy == pytest.approx(p, abs=four_standard_errors(p)), (expert, skill)
    random_pair = sum(measured.values()) / len(measured)  # a mean of 16 pairs: at most 1/2 the error of one
    assert random_pair == pytest.approx(analytic["random_pair"], abs=four_standard_errors(0.2) / 2)
    oracle = [run_pair(registry, backends, *registry.oracle[s.family], s) == s.ground_truths[0] for s in samples]
    assert sum(oracle) / len(oracle) == pytest.approx(analytic["oracle"], abs=four_standard_errors(0.95))


def test_grid_router_dispatches_by_the_words_of_the_question(registry):
    backends = toyworld.toy_backends(registry)
    for sample in toyworld.make_samples("test", 40):
        if sample.family == "grid":
            ctx = SkillContext(registry, registry.skills["Grid_Router"], backends["GridEye"], Services({}),
                               sample.question, sample.images)
            child = "Grid_Size_Reader" if "rows" in sample.question else "Cell_Colour_Reader"
            assert run_skill(ctx).path == ("Grid_Router", child)


def test_http_server_gives_the_same_replies_as_in_process(registry):
    samples = toyworld.make_samples("test", 24, seed=2)
    rng = random.Random(0)
    pairs = [(rng.choice(list(registry.experts)), rng.choice(["Bar_Reader", "Shape_Counter", "Grid_Router",
                                                                "Angle_Solver"])) for _ in samples]
    in_process = toyworld.toy_backends(registry)
    with toyworld.toy_server() as server:
        data = json.loads(TOY_CONFIG.read_text())
        for expert in data["experts"]:
            expert["base_url"] = server.url
        over_http = build_backends(Registry.from_dict(data))
        for sample, (expert, skill) in zip(samples, pairs):
            local = run_pair(registry, in_process, expert, skill, sample)
            remote = run_pair(registry, over_http, expert, skill, sample)
            assert local == remote, (expert, skill, sample.question)
        message = f"Task: read_bar\nRequest: {samples[0].question}"
        local_reply = in_process["ChartSeer"].chat(message, samples[0].images)
        remote_reply = over_http["ChartSeer"].chat(message, samples[0].images)
        assert (local_reply.text, local_reply.prompt_tokens, local_reply.completion_tokens) == \
               (remote_reply.text, remote_reply.prompt_tokens, remote_reply.completion_tokens)


def test_toy_policy_prompt_tokens_and_demonstrations(registry):
    from environment import Environment, demonstration_turns
    from maestro import parse_action, reply_of
    from policy import build_prompt, tokenizer_of

    model, processor = toyworld.build_toy_policy(registry)
    tokenizer = tokenizer_of(processor)
    for name in [*registry.experts, *registry.skills, "@@"]:
        assert len(tokenizer.encode(name, add_special_tokens=False)) == 1, name
    sample = toyworld.make_samples("test", 1)[0]
    prompt = build_prompt(processor, registry, sample)
    assert prompt["input_ids"].shape[1] < 300  # registry's fixed prompt sections are ~230 of these
    assert prompt["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4 visual tokens per 64x64 image
    env = Environment(registry, toyworld.toy_backends(registry), Services({}), tokenizer)
    rng = random.Random(0)
    for sample in toyworld.make_samples("train", 8):
        (call, answer), _ = demonstration_turns(sample, env, rng, toyworld.request_of)
        action = parse_action(call)
        assert action.kind == "search" and action.query == toyworld.request_of(sample.question)
        [result] = env.step([action], [sample])
        assert answer == f"<answer>{reply_of(result.observation)}</answer>" and not result.error


def test_serve_command_serves_the_toy_experts():
    import subprocess
    import sys

    from experts import OpenAIChatClient

    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, "toyworld.py", "serve", "--port", "0"], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        sample = toyworld.make_samples("test", 1)[0]
        message = f"Task: read_bar\nRequest: {sample.question}"
        reply = OpenAIChatClient("ChartSeer", url, "ChartSeer").chat(message, sample.images)
        assert reply.text == toyworld.expert_reply("bar", message, sample.images)
    finally:
        server.terminate()
        server.wait(timeout=10)
