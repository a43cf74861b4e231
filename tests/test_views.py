"""Registries of capability cards and per-sample renamed views (issue 14): a toy expert's
competence follows its card and never its name, every sample of a batch resolves names against
its own view, views carry nothing about the sample, and routing choices are the tokens that tell
names apart."""

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

import eval as evaluation
import toyworld
from data import with_views
from environment import Environment
from experts import Services
from maestro import format_answer, format_call, parse_action, reply_of, system_prompt
from policy import load_policy
from registry import Registry, draw_view, view_ids
from rollout import trajectory_from_texts
from scoring import RewardConfig
from skills import SkillContext, run_skill

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
POOL, SEEN, UNSEEN, AUGMENTED = (CONFIGS / name for name in ("toy_pool.json", "toy_seen.json", "toy_unseen.json",
                                                             "toy_augmented.json"))


@pytest.fixture(scope="module")
def pool():
    return Registry.load(POOL)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_policy(tiny_dir)[1].tokenizer


def toy_env(registry, tokenizer):
    return Environment(registry, toyworld.toy_backends(registry), Services({}), tokenizer)


def test_two_registries_differing_only_in_names_are_the_same_world(pool, tokenizer):
    """Renaming every expert and skill changes no closed-form baseline and no expert reply."""
    names = {"experts": {name: f"expert-{i}" for i, name in enumerate(pool.experts)},
             "skills": {name: f"skill-{i}" for i, name in enumerate(pool.skills)}}
    renamed = pool.renamed(names["experts"], names["skills"])
    original, other = toyworld.analytic_baselines(pool), toyworld.analytic_baselines(renamed)
    assert {k: original[k] for k in ("random_pair", "best_fixed_pair", "oracle")} == \
        {k: other[k] for k in ("random_pair", "best_fixed_pair", "oracle")}
    for expert, row in original["pairs"].items():
        for skill, accuracy in row.items():
            assert other["pairs"][names["experts"][expert]][names["skills"][skill]] == accuracy
    samples = toyworld.make_samples("test", 16, seed=2)
    env, renamed_env = toy_env(pool, tokenizer), toy_env(renamed, tokenizer)
    for expert in pool.advertised_experts():
        for skill in pool.advertised_skills():
            calls = [parse_action(format_call(expert.name, skill.name, s.question)) for s in samples]
            same = [parse_action(format_call(names["experts"][expert.name], names["skills"][skill.name], s.question))
                    for s in samples]
            assert [r.observation for r in env.step(calls, samples)] == \
                [r.observation for r in renamed_env.step(same, samples)]


def test_competence_follows_the_card_not_the_name(pool):
    """The same name with another card is another expert; two names with one card reply alike."""
    samples = [s for s in toyworld.make_samples("test", 64, seed=5) if s.family == "bar"]
    messages = [f"Task: read_bar\nRequest: {s.question}" for s in samples]
    bar, also_bar, count = (toyworld.ToyExpert(name, card) for name, card in
                            (("toy-bar", "bar"), ("Whoever", "bar"), ("toy-bar", "count")))
    as_bar = [bar.chat(m, s.images).text for m, s in zip(messages, samples)]
    assert as_bar == [also_bar.chat(m, s.images).text for m, s in zip(messages, samples)]
    right = sum(reply == s.ground_truths[0] for reply, s in zip(as_bar, samples))
    right_as_count = sum(count.chat(m, s.images).text == s.ground_truths[0] for m, s in zip(messages, samples))
    assert right >= 0.8 * len(samples) and right_as_count <= 0.5 * len(samples)
    assert toyworld.analytic_baselines(Registry.load(UNSEEN))["oracle"] == 0.95  # cards, not names


def test_served_models_reply_by_their_card_over_http():
    from experts import OpenAIChatClient
    sample = next(s for s in toyworld.make_samples("test", 8) if s.family == "angle")
    message = f"Task: third_angle\nRequest: {sample.question}"
    with toyworld.toy_server() as server:
        for model, card in (("expert-17", "angle"), ("toy-poetry", "poetry"), ("GeoMind", "angle")):
            reply = OpenAIChatClient(model, server.url, model).chat(message, sample.images).text
            assert reply == toyworld.expert_reply(card, message, sample.images)


def test_a_view_renames_consistently_and_keeps_the_cards(pool):
    ids = view_ids("51-99")
    view = draw_view(pool, random.Random(3), ids)
    again = draw_view(pool, random.Random(3), ids)
    assert system_prompt(view) == system_prompt(again)
    assert {view.expert_origin[e] for e, _ in view.oracle.values()} == {e for e, _ in pool.oracle.values()}
    for name, expert in view.experts.items():
        assert name.startswith("expert-") and int(name.split("-")[1]) in ids
        assert expert.speciality == pool.experts[view.expert_origin[name]].speciality
    for family, (expert, skill) in view.oracle.items():
        assert (view.expert_origin[expert], view.skill_origin[skill]) == pool.oracle[family]
    router = next(s for s in view.skills.values() if s.children)
    assert all(view.skill_origin[c] in pool.skills[view.skill_origin[router.name]].children for c in router.children)
    assert router.default_child in router.children and set(router.route_keywords) <= set(router.children)
    seen_sizes = {len(draw_view(pool, random.Random(i), ids).experts) for i in range(40)}
    assert min(seen_sizes) == 5 and max(seen_sizes) == len(pool.experts)  # the four fitting ones, 1+ others
    level_1 = [name for name, skill in pool.skills.items() if skill.level == 1]
    for family, (expert, skill) in pool.oracle.items():  # a sample's view: its own pair and a random rest
        family_views = [draw_view(pool, random.Random(i), ids, family) for i in range(60)]
        for v in family_views:
            assert (v.expert_origin[v.oracle[family][0]], v.skill_origin[v.oracle[family][1]]) == (expert, skill)
            kept = set(v.skill_origin.values())
            assert all(set(pool.skills[k].children) <= kept for k in kept)  # a router comes with its children
            assert set(v.oracle) == {f for f, (e, k) in pool.oracle.items()
                                     if e in v.expert_origin.values() and k in kept}
        assert {len(v.advertised_experts()) for v in family_views} == set(range(2, len(pool.experts) + 1))
        assert {len(v.advertised_skills()) for v in family_views} == set(range(2, len(level_1) + 1))
    views = [draw_view(pool, random.Random(i), ids) for i in range(20)]
    orders = {tuple(v.expert_origin[e.name] for e in v.advertised_experts()) for v in views}
    assert len(orders) > 10  # the cards come in shuffled order
    with pytest.raises(ValueError, match="registry_views: expected ids 'A-B'"):
        view_ids("51..99")
    with pytest.raises(ValueError, match="distinct ids"):
        draw_view(pool, random.Random(0), range(3))
    router = next(name for name, skill in pool.skills.items() if skill.children)
    with pytest.raises(ValueError, match="holds each router's children"):
        pool.renamed({}, {router: "skill-10"})


def test_each_sample_of_a_batch_resolves_names_against_its_own_view(pool, tokenizer):
    """One env.step over a batch whose samples carry different views: each call reaches the expert
    its own view names; a name from another sample's view is unknown here, with this view's names."""
    ids = view_ids("51-99")
    samples = toyworld.make_samples("test", 8, seed=1)
    views = [draw_view(pool, random.Random(100 + i), ids) for i in range(len(samples))]
    samples = [replace(s, registry=v) for s, v in zip(samples, views)]
    env = toy_env(pool, tokenizer)
    actions = [parse_action(format_call(*v.oracle[s.family], s.question)) for s, v in zip(samples, views)]
    for sample, view, result in zip(samples, views, env.step(actions, samples)):
        expert, skill = view.oracle[sample.family]
        assert (result.expert, result.skill) == (expert, skill) and not result.error
        card = view.experts[expert].speciality
        task = view.skills[result.path[-1]].implementation.split(":")[1]
        message = f"Task: {task}\nRequest: {sample.question}"
        assert reply_of(result.observation) == toyworld.expert_reply(card, message, sample.images)
    foreign = next(e for e in views[1].experts if e not in views[0].experts)
    [result] = env.step([parse_action(format_call(foreign, views[0].oracle["bar"][1], "bar C"))], samples[:1])
    assert result.error == "unknown_model" and all(name in result.observation for name in views[0].experts)


def test_no_ground_truth_in_any_card_and_views_know_only_the_samples_family(pool):
    answers = {a for space in toyworld.ANSWER_SPACE.values() for a in space}
    for path in (POOL, SEEN, UNSEEN, AUGMENTED, CONFIGS / "toy.json"):
        registry = Registry.load(path)
        cards = [e.speciality for e in registry.experts.values()] + [s.task for s in registry.skills.values()]
        assert all(card and not set(card.replace("_", " ").split()) & answers for card in cards), path
    cfg = {"registry_views": "51-99", "seed": 0}
    a, b = toyworld.make_samples("test", 6, seed=0), toyworld.make_samples("train", 6, seed=9)
    assert [s.family for s in a] == [s.family for s in b] and a[0].question != b[0].question
    views_a, views_b = with_views(a, pool, cfg, "grpo/7"), with_views(b, pool, cfg, "grpo/7")
    assert [system_prompt(s.registry) for s in views_a] == [system_prompt(s.registry) for s in views_b]
    other = next(s for s in b if s.family != a[0].family)  # of the sample, a view knows its family only
    [view] = [s.registry for s in with_views([other], pool, cfg, "grpo/7")]
    assert other.family in view.oracle and view.expert_origin[view.oracle[other.family][0]] == pool.oracle[other.family][0]
    assert with_views(a, pool, dict(cfg, registry_views=""), "grpo/7") is a
    stored = [replace(s, prompt=({"role": "system", "content": "Models: toy-bar"},)) for s in a]
    assert all(s.prompt is None for s in with_views(stored, pool, cfg, "grpo/7"))  # the view's prompt
    grow = dict(cfg, view_growth_steps=100)  # the view-size curriculum: one other expert and skill first
    first, last = with_views(a * 5, pool, grow, "grpo/0", 0), with_views(a * 5, pool, grow, "grpo/99", 99)
    assert {(len(s.registry.advertised_experts()), len(s.registry.advertised_skills())) for s in first} == {(2, 2)}
    assert {len(s.registry.advertised_experts()) for s in last} == set(range(2, len(pool.experts) + 1))
    assert [system_prompt(s.registry) for s in last] == [system_prompt(s.registry) for s in
                                                         with_views(a * 5, pool, cfg, "grpo/99", 99)]
    no_oracle = Registry.from_dict({**json.loads(POOL.read_text()), "oracle": {}})
    with pytest.raises(ValueError, match="no advertised oracle expert"):
        draw_view(no_oracle, random.Random(0), view_ids("51-99"))


def test_unseen_registry_names_never_occur_in_training_views(pool):
    """The randomized job's views never name an expert or skill of toy_unseen.json, yet each unseen
    id is a new combination of digits that training ids have in the same places."""
    unseen = Registry.load(UNSEEN)
    job = json.loads((CONFIGS / "toy_registry.json").read_text())
    ids = view_ids(job["registry_views"], str(CONFIGS.parent / job["heldout_registry"]))
    train_names = {f"{kind}-{n}" for kind in ("expert", "skill") for n in ids}
    unseen_names = set(unseen.experts) | set(unseen.skills)
    assert not unseen_names & train_names and len(ids) > 70
    for name in unseen_names:
        digits = name.split("-")[1]
        assert all(any(len(str(n)) == len(digits) and str(n)[i] == d for n in ids) for i, d in enumerate(digits))
    assert view_ids("10-20", str(UNSEEN)) == [10, 11, 13, 15, 19, 20]
    with pytest.raises(ValueError, match="heldout_registry .* is set but registry_views is not"):
        view_ids("", str(UNSEEN))
    assert set(Registry.load(SEEN).experts) <= train_names
    assert toyworld.analytic_baselines(unseen)["oracle"] == toyworld.analytic_baselines(pool)["oracle"]


def test_views_policy_reads_cards_and_its_choices_are_the_id_tokens(pool, tmp_path):
    """The views' tokenizer splits an id into digits, the prompt lists each name with its card, and
    a teacher-forced call's routing choices sit on a digit of the id (the one that tells the name
    apart: '6' of expert-63 when no other expert-6x is listed), not on 'expert'."""
    from policy import save_policy
    ids = view_ids("51-99")
    save_policy(*toyworld.build_toy_policy(pool, "tiny", seed=0, view_ids=ids), tmp_path)
    _, processor = load_policy(tmp_path)
    tokenizer = processor.tokenizer
    view = draw_view(pool, random.Random(8), ids)
    sample = replace(toyworld.make_samples("test", 1)[0], registry=view)
    env = toy_env(pool, tokenizer)
    expert, skill = view.oracle[sample.family]
    call = format_call(expert, skill, toyworld.request_of(sample.question))
    [result] = env.step([parse_action(call)], [sample])
    traj = trajectory_from_texts(processor, sample, env, [call, format_answer(reply_of(result.observation))])
    prompt = tokenizer.decode(traj.prompt_ids)
    assert all(f"{e.speciality}: {e.name}" in prompt for e in view.advertised_experts())
    chosen = [tokenizer.decode([traj.response_ids[p]]) for p, _, _ in traj.choice_positions]
    names = {"expert": [e.name for e in view.advertised_experts()], "skill": [s.name for s in view.advertised_skills()]}
    # the digit right after the longest prefix the name shares with another listed name (digits are tokens)
    parts = [max(len(os.path.commonprefix([name, other])) for other in names[kind] if other != name)
             for name, kind in ((expert, "expert"), (skill, "skill"))]
    assert chosen == [name[at] for name, at in zip((expert, skill), parts)]
    assert all(c.isdigit() for c in chosen)
    assert tokenizer.tokenize("expert-63") == ["expert", "-", "6", "3"]
    record = evaluation.record(traj, RewardConfig(), env)
    assert record["routed_right"] is True and record["first_pair"] == "@@".join(pool.oracle[sample.family])


def test_a_toy_skill_card_must_say_what_it_asks(tmp_path):
    data = json.loads(POOL.read_text())
    data["skills"][0]["task"] = "count_shapes"  # read-bar's implementation asks for read_bar
    (tmp_path / "lying.json").write_text(json.dumps(data))
    cfg = {"registry": str(tmp_path / "lying.json"), "experts": "toy", "seed": 0, "num_test": 4,
           "train_data": "", "test_data": ""}
    with pytest.raises(ValueError, match="asks for the task 'read_bar'.*card says task 'count_shapes'"):
        toyworld.world(cfg)


def test_the_augmented_registry_adds_a_family_no_training_registry_serves(pool):
    """configs/toy_augmented.json is the unseen registry plus a 'shape' expert and skill under held-out
    names; its world asks shape questions too, its fitting pair answers them as the closed form says,
    and a world whose oracle does not name the family never asks them."""
    unseen, augmented = Registry.load(UNSEEN), Registry.load(AUGMENTED)
    assert {n: augmented.experts[n].speciality for n in set(augmented.experts) - set(unseen.experts)} == {"expert-14": "shape"}
    assert {n: augmented.skills[n].task for n in set(augmented.skills) - set(unseen.skills)} == {"skill-23": "name_shape"}
    job = json.loads((CONFIGS / "toy_registry.json").read_text())
    held_out = set(range(10, 100)) - set(view_ids(job["registry_views"], str(CONFIGS.parent / job["heldout_registry"])))
    assert {14, 23} <= held_out  # expert-14 and skill-23 never occur in a training view
    for registry in (pool, unseen, Registry.load(SEEN), Registry.load(CONFIGS / "toy.json")):
        assert toyworld.families_of(registry) == toyworld.FAMILIES
    cfg = {"registry": str(AUGMENTED), "experts": "toy", "seed": 0, "num_test": 10, "train_data": "", "test_data": ""}
    world = toyworld.world(cfg)
    assert [s.family for s in world.test] == [*toyworld.FAMILIES, "shape"] * 2
    shapes = toyworld.make_samples("test", 300, seed=2, families=("shape",))
    backends, fitting = toyworld.toy_backends(augmented), augmented.oracle["shape"]
    for expert, skill in (fitting, (fitting[0], "skill-12"), ("expert-31", fitting[1])):
        replies = [run_skill(SkillContext(augmented, augmented.skills[skill], backends[expert], Services({}),
                                          toyworld.request_of(s.question), s.images)).text for s in shapes]
        assert set(replies) <= set(toyworld.SHAPES)
        measured = sum(r == s.ground_truths[0] for r, s in zip(replies, shapes)) / len(shapes)
        expected = toyworld.pair_accuracy(augmented, augmented.experts[expert], augmented.skills[skill], "shape")
        assert measured == pytest.approx(expected, abs=4 * (expected * (1 - expected) / len(shapes)) ** 0.5)
    baselines = toyworld.analytic_baselines(augmented)
    assert baselines["oracle"] == pytest.approx(0.95) and baselines["best_fixed_pair"] < 0.3125
