"""The rollout engine against closed forms: the KV-cached multi-turn path equals one full forward,
sampling log-probs equal recomputed ones, greedy turns equal model.generate, the token layout is
the documented one, and bad policies or budgets never break the loop.

The shared policy is a tiny Qwen3-VL that was fine-tuned for 60 SFT steps (inside the fixture, on
teacher-forced demonstrations built by trajectory_from_texts) so that it really emits searches and
answers: its rollouts have ragged numbers of turns, ragged stops and observations appended to some
rows only. It is saved and reloaded with load_policy, the path a real checkpoint takes.
"""
import dataclasses
import math
import random

import pytest
import torch
from PIL import Image

import maestro
import rollout as engine
from data import Sample
from environment import Environment
from experts import Reply, Services
from logprobs import collate, compute_logprobs
from maestro import system_prompt
from policy import (build_policy, build_processor, build_prompt, build_tokenizer, chat_messages, load_policy,
                    observation_glue, save_policy, suppressed_ids)
from registry import Registry
from rollout import RolloutConfig, rollout, rope_positions, trajectory_from_texts

REGISTRY = {
    "experts": [
        {"name": "Bar-Reader", "description": "reads bar charts", "base_url": "http://127.0.0.1:9/v1"},
        {"name": "Shape-Counter", "description": "counts shapes", "base_url": "http://127.0.0.1:9/v1"},
    ],
    "skills": [
        {"name": "Read_Bar", "level": 1, "description": "bar values", "implementation": "toy:read_bar"},
        {"name": "Count_Shapes", "level": 1, "description": "counting", "implementation": "toy:count_shapes"},
    ],
    "prompt": {"guidelines": False, "examples": False},
}
QUESTIONS = ["What is bar C?", "How many circles are there in the picture, counting the small ones too?",
             "Which bar is tallest?", "Count the squares."]
IMAGE_SIZES = [(64, 64), (48, 96), (100, 70), (32, 80)]
SEARCH_CLOSE_LAYOUT = ("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")


class WordsExpert:
    """In-process expert backend: replies with `words` words (long replies get truncated)."""

    def __init__(self, name, words):
        self.name, self.words = name, words

    def chat(self, text, images=(), system=None, **generation):
        reply = " ".join(["the value is 7"] * self.words)
        return Reply(reply, len(text.split()), 4 * self.words, 0.0)


def make_env(tokenizer, words=3, obs_token_budget=128):
    registry = Registry.from_dict(REGISTRY)
    backends = {name: WordsExpert(name, words) for name in registry.experts}
    return Environment(registry, backends, Services({}), tokenizer, obs_token_budget=obs_token_budget)


def make_samples():
    """Short stored prompts (fast CPU tests), ragged question lengths and image sizes."""
    samples = []
    for i, (question, size) in enumerate(zip(QUESTIONS, IMAGE_SIZES)):
        prompt = ({"role": "system", "content": "Call an expert with search, then answer."},
                  {"role": "user", "content": "<image>" + question})
        samples.append(Sample(id=f"s{i}", question=question, images=(Image.new("RGB", size, (40 * i, 90, 200)),),
                              ground_truths=("7",), data_source="toy", prompt=prompt))
    return samples


def demo(rng, registry):
    experts = [e.name for e in registry.advertised_experts()]
    skills = [s.name for s in registry.advertised_skills()]
    calls = rng.choice([0, 1, 1, 2])
    searches = [f"<search> {rng.choice(experts)}@@{rng.choice(skills)}: value </search>" for _ in range(calls)]
    return searches + ["<answer> 7 </answer>"]


def build_tokenizer_for(registry, samples):
    corpus = [system_prompt(registry), *[s.question for s in samples], "the value is 7 " * 4,
              "Call an expert with search, then answer.",
              *[" ".join(demo(random.Random(i), registry)) for i in range(20)]]
    names = [e.name for e in registry.experts.values()] + [s.name for s in registry.skills.values()]
    return build_tokenizer(corpus, extra_tokens=("@@", *names))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.3M-parameter model only pays thread synchronisation for more
    torch.manual_seed(0)
    samples = make_samples()
    registry = Registry.from_dict(REGISTRY)
    processor = build_processor(build_tokenizer_for(registry, samples))
    model = build_policy(processor, "tiny", seed=0)
    env = make_env(processor.tokenizer)
    rng = random.Random(0)
    demos = [trajectory_from_texts(processor, s, env, demo(rng, registry)) for s in samples * 8]
    batches = [collate(demos[i:i + 8], processor) for i in range(0, len(demos), 8)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = batches[step % len(batches)]
        loss = -compute_logprobs(model, batch)["logprobs"].sum() / batch["num_tokens"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0, f"SFT of the test policy did not converge (loss {loss.item():.2f})"
    directory = tmp_path_factory.mktemp("policy")
    save_policy(model, processor, directory)
    model, processor = load_policy(directory)
    yield model, processor, env, samples
    torch.set_num_threads(threads)


def sampled_logprob_error(model, processor, trajectories, temperature):
    batch = collate(trajectories, processor)
    recomputed = compute_logprobs(model, batch, temperature)["logprobs"]
    mask = batch["loss_mask"][:, 1:].bool()
    assert torch.all(recomputed[~mask] == 0)
    return (recomputed[mask] - batch["old_logprobs"][:, 1:][mask]).abs().max().item()


def record_drawn_logits(monkeypatch):
    """{(id(trajectory), response index): the logits that response token was sampled from}, for the
    sampled tokens still in the trajectory: sample_tokens gets the logits of the sampling rows in
    order, each row then appends its token (with its log-prob) in that order. Tokens appended
    without a log-prob (upstream's edited turns) replace what was sampled at their positions."""
    pending, drawn_from = [], {}
    sample_tokens, append = engine.sample_tokens, engine._Row.append

    def recording_sample_tokens(logits, suppressed, cfg):
        pending.extend(logits.float().unbind(0))
        return sample_tokens(logits, suppressed, cfg)

    def recording_append(row, ids, sampled, logprobs=None):
        start = len(row.traj.response_ids)
        if logprobs is not None:
            drawn_from[(id(row.traj), start)] = pending.pop(0)
        else:
            for j in range(start, start + len(ids)):
                drawn_from.pop((id(row.traj), j), None)
        append(row, ids, sampled, logprobs)

    monkeypatch.setattr(engine, "sample_tokens", recording_sample_tokens)
    monkeypatch.setattr(engine._Row, "append", recording_append)
    return pending, drawn_from


def cached_vs_full_forward(model, processor, trajectories, drawn_from):
    """Largest |cached logits - full-forward logits| over the recorded sampled tokens; also checks
    that the positions used when sampling are get_rope_index's over the final sequences."""
    batch = collate(trajectories, processor)
    positions, _ = rope_positions(model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     use_cache=False).logits
    worst, checked = 0.0, 0
    for r, traj in enumerate(trajectories):
        p, n = len(traj.prompt_ids), len(traj.prompt_ids) + len(traj.response_ids)
        assert torch.equal(traj.position_ids, positions[:, r, :n]), "positions used != get_rope_index"
        for j, sampled in enumerate(traj.loss_mask):
            if sampled and (id(traj), j) in drawn_from:
                worst = max(worst, (drawn_from[(id(traj), j)] - full[r, p + j - 1]).abs().max().item())
                checked += 1
    return worst, checked


def test_cached_rollout_logits_equal_full_forward(policy, monkeypatch):
    model, processor, env, samples = policy
    pending, drawn_from = record_drawn_logits(monkeypatch)
    torch.manual_seed(3)
    cfg = RolloutConfig(group_size=4, max_turns=2, max_turn_tokens=16, max_response_tokens=400)
    trajectories = rollout(model, processor, samples[:3], env, cfg)

    turns = [t.num_turns for t in trajectories]
    assert max(turns) == 3 and min(turns) < 3, f"need ragged multi-turn rows, got turns {turns}"
    assert any(turn.result is not None for t in trajectories for turn in t.turns)
    assert not pending and len(drawn_from) == sum(map(sum, (t.loss_mask for t in trajectories)))
    worst, _ = cached_vs_full_forward(model, processor, trajectories, drawn_from)
    assert worst < 1e-4


def test_upstream_protocol_rollout_keeps_what_upstream_kept_and_the_cache_exact(policy, monkeypatch):
    """Under upstream's turn loop (no stop strings, edited and dropped turns masked out of the cache,
    what was kept fed anew), the tokens sampled afterwards still come from logits equal to a full
    forward over the final sequence, and every kept turn is what upstream_edit keeps."""
    model, processor, _, samples = policy
    env = make_env(processor.tokenizer)
    env.protocol = "upstream"
    pending, drawn_from = record_drawn_logits(monkeypatch)
    torch.manual_seed(5)
    cfg = RolloutConfig(group_size=4, max_turns=2, max_turn_tokens=24, max_response_tokens=400, protocol="upstream")
    trajectories = rollout(model, processor, samples[:3], env, cfg)
    worst, checked = cached_vs_full_forward(model, processor, trajectories, drawn_from)
    assert checked > 20 and worst < 1e-4
    tokenizer = processor.tokenizer
    edited = 0
    for traj in trajectories:
        text = tokenizer.decode(traj.response_ids)
        for turn in traj.turns:  # a kept turn ends with its action block (an edited one, with <|im_end|>)
            if turn.action.kind in ("search", "answer"):
                assert turn.text.removesuffix("<|im_end|>").rstrip().endswith(f"</{turn.action.kind}>")
        # observations are bare user turns: no assistant header is added after them
        assert text.count("<|im_start|>user<information>") == sum(t.result is not None for t in traj.turns)
        edited += sum(math.isnan(p) for p, m in zip(traj.sample_logprobs, traj.loss_mask) if m)
    assert edited > 0  # some turns were edited (their tokens were not sampled in this context)
    assert any(t.generations > t.num_turns for t in trajectories)  # and some dropped
    assert all(t.generations <= cfg.max_turns + 1 for t in trajectories)
def two_groups(policy, seed, **settings):
    """A sampled rollout of the first two samples, 4 trajectories each, 2 calls of up to 16 tokens."""
    model, processor, env, samples = policy
    torch.manual_seed(seed)
    return rollout(model, processor, samples[:2], env,
                   RolloutConfig(group_size=4, max_turns=2, max_turn_tokens=16, **settings))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_recomputed(policy, temperature):
    model, processor, _, _ = policy
    trajectories = two_groups(policy, 4, max_response_tokens=400, temperature=temperature)
    assert sampled_logprob_error(model, processor, trajectories, temperature) < 1e-4


def test_choice_logprobs_at_name_positions(policy):
    model, processor, env, samples = policy
    trajectories = two_groups(policy, 5)
    tokenizer = processor.tokenizer
    searches = 0
    for traj in trajectories:
        names = [n for turn in traj.turns if turn.action.kind == "search"
                 for n in (turn.action.model, turn.action.skill)]
        searches += len(names) // 2
        assert len(traj.choice_positions) == len(names)
        for (position, kind, candidates), name in zip(traj.choice_positions, names):
            assert traj.loss_mask[position] == 1
            assert name.startswith(tokenizer.decode(traj.response_ids[position]).strip())
            advertised = env.registry.advertised_skills() if kind == "skill" else env.registry.advertised_experts()
            assert sorted(tokenizer.decode(c).strip() for c in candidates) == sorted(a.name for a in advertised)
    assert searches > 0
    batch = collate(trajectories, processor)
    out = compute_logprobs(model, batch, with_choices=True)
    for kind, index in batch["choice_index"].items():
        choice, candidates = out["choice_logprobs"][kind], batch["choice_candidates"][kind]
        assert choice.shape == candidates.shape == (index.shape[0], 2) and batch["choice_mask"][kind].all()
        chosen = batch["input_ids"][index[:, 0], index[:, 1] + 1]
        column = (chosen[:, None] == candidates).float().argmax(1)
        assert (chosen[:, None] == candidates).any(1).all()  # the policy's own choice is a candidate
        token_logprobs = out["logprobs"][index[:, 0], index[:, 1]]
        assert torch.allclose(choice[torch.arange(len(column)), column], token_logprobs, atol=1e-6)


def test_choice_candidates_follow_the_spelling_of_the_call():
    """With names that are not single tokens (as in Qwen's vocabulary, where an expert name is
    ' Bar' after '<search> ' and 'Bar' after '<search>'), each call's candidates are the names
    spelled as that call spells its own: the chosen token is always among them."""
    calls = {spaced: maestro.format_call("Bar-Reader", "Read_Bar", "value", spaced=spaced) for spaced in (False, True)}
    tokenizer = build_tokenizer([*calls.values(), "<search> Shape-Counter@@Count_Shapes: how many"] * 20, vocab_size=400)
    env = make_env(tokenizer)
    sample = dataclasses.replace(make_samples()[0], images=())
    candidates = {}
    for spaced, call in calls.items():
        traj = trajectory_from_texts(tokenizer, sample, env, [call, "<answer> 7 </answer>"])
        for position, kind, ids in traj.choice_positions:
            assert traj.response_ids[position] in ids and len(ids) == 2
            candidates[spaced, kind] = ids
    expert = {spaced: tokenizer.convert_ids_to_tokens(list(candidates[spaced, "expert"])) for spaced in calls}
    assert expert == {False: ["Bar", "Shape"], True: ["\u0120Bar", "\u0120Shape"]}  # \u0120: byte-level BPE's space
    assert candidates[False, "skill"] == candidates[True, "skill"]  # '@@' comes before a skill in both spellings
    # names that part a few tokens in: the choice is the last token where the names that share the
    # chosen one's tokens so far part, its candidates their tokens there; a name that is a prefix of
    # another parts from it at the token after it
    skills = ["OCR_Text_Reader", "OCR_Key_Finder", "Read_Bar", "Read_Bar_Fast"]
    tokenizer = build_tokenizer([maestro.format_call("Bar-Reader", s, "value") for s in skills] * 20, vocab_size=400)
    names = {"expert": ["Bar-Reader", "Shape-Counter"], "skill": skills}
    expected = {"OCR_Text_Reader": ("_Text", ["_Key", "_Text"]), "Read_Bar": (":", [":", "_Fast"]),
                "Read_Bar_Fast": ("_Fast", [":", "_Fast"])}
    for skill, (token, there) in expected.items():
        call = maestro.format_call("Bar-Reader", skill, "value")
        ids = tokenizer(call, add_special_tokens=False)["input_ids"]
        [_, (position, kind, ids_there)] = maestro.choice_tokens(tokenizer, call, ids, maestro.parse_action(call), names)
        assert kind == "skill" and tokenizer.convert_ids_to_tokens(ids[position]) == token
        assert sorted(tokenizer.convert_ids_to_tokens(list(ids_there))) == there
    # an only expert is no choice
    call = maestro.format_call("Bar-Reader", "Read_Bar", "value")
    ids = tokenizer(call, add_special_tokens=False)["input_ids"]
    only = maestro.choice_tokens(tokenizer, call, ids, maestro.parse_action(call), dict(names, expert=["Bar-Reader"]))
    assert [kind for _, kind, _ in only] == ["skill"]


def test_greedy_turn_equals_generate(policy):
    model, processor, env, samples = policy
    cfg = RolloutConfig(group_size=1, max_turns=0, max_turn_tokens=24, greedy=True)
    trajectories = rollout(model, processor, samples, env, cfg)
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(chat_messages(processor, env.registry, s), add_generation_prompt=True,
                                           tokenize=False) for s in samples]
    inputs = processor(text=texts, images=[s.images[0] for s in samples], padding=True, return_tensors="pt")
    end_of_turn = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=24, stop_strings=list(maestro.STOP_STRINGS),
                             tokenizer=tokenizer, eos_token_id=end_of_turn, pad_token_id=tokenizer.pad_token_id,
                             suppress_tokens=suppressed_ids(processor))
    generated = out[:, inputs["input_ids"].shape[1]:].tolist()
    assert any(t.turns[0].text.endswith("</search>") for t in trajectories)
    for traj, row in zip(trajectories, generated):
        n = len(traj.response_ids)
        assert row[:n] == traj.response_ids
        assert all(token == tokenizer.pad_token_id for token in row[n:])


@pytest.mark.parametrize("protocol", ["ours", "upstream"])
def test_static_and_compiled_decode_equal_dynamic(policy, protocol):
    """The preallocated KV cache, and its torch.compile'd one-token step, give the dynamic path's
    tokens exactly (greedy, multi-turn: observations fed, finished rows dropped from the cache;
    under upstream's loop, edited turns left as holes)."""
    model, processor, _, samples = policy
    env = make_env(processor.tokenizer, words=8, obs_token_budget=64)  # long observations: the cache doubles
    env.protocol = protocol
    cfg = RolloutConfig(group_size=1, max_turns=2, max_turn_tokens=16, max_response_tokens=400, greedy=True,
                        protocol=protocol)
    torch._dynamo.utils.counters.clear()
    runs = {decode: rollout(model, processor, samples, env, dataclasses.replace(cfg, decode=decode))
            for decode in ("dynamic", "static", "compiled")}
    assert not torch._dynamo.utils.counters["graph_break"], "the compiled step must be one graph (a CUDA graph on GPU)"
    turns = [t.num_turns for t in runs["dynamic"]]
    assert max(turns) > 1 and min(turns) < max(turns), f"need ragged multi-turn rows, got turns {turns}"
    for decode in ("static", "compiled"):
        for dynamic, other in zip(runs["dynamic"], runs[decode]):
            assert other.response_ids == dynamic.response_ids, decode
            assert other.sample_logprobs == pytest.approx(dynamic.sample_logprobs, abs=1e-4, nan_ok=True), decode
    with pytest.raises(ValueError, match="decode"):
        rollout(model, processor, samples, env, dataclasses.replace(cfg, decode="cuda-graphs"))


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_compaction_changes_nothing_but_the_work(policy, decode, monkeypatch):
    """Rows whose turn ended, set aside from the decode steps and put back at the turn's end, give
    the same sampled trajectories (the same draws: row order is restored), log-probs and positions
    as rows that stay in every step, on a dynamic cache and on a static one."""
    model, processor, _, samples = policy
    env = make_env(processor.tokenizer, words=8, obs_token_budget=64)
    cfg = RolloutConfig(group_size=4, max_turns=2, max_turn_tokens=16, max_response_tokens=400, decode=decode)
    set_aside = []
    original = engine._Batch.set_aside
    monkeypatch.setattr(engine._Batch, "set_aside", lambda batch, waiting: set_aside.append(sum(waiting))
                        or original(batch, waiting))
    runs = {}
    for compact in (False, True):
        torch.manual_seed(3)
        runs[compact] = rollout(model, processor, samples, env, dataclasses.replace(cfg, compact=compact))
        assert bool(set_aside) == compact, "only the compacting run sets rows aside"
    lengths = [len(t.response_ids) for t in runs[False]]
    assert len(set(lengths)) > 4, f"need ragged rows, got lengths {lengths}"
    for plain, compacted in zip(runs[False], runs[True]):
        assert compacted.response_ids == plain.response_ids
        assert compacted.loss_mask == plain.loss_mask
        assert compacted.sample_logprobs == pytest.approx(plain.sample_logprobs, abs=1e-5)
        assert torch.equal(compacted.position_ids, plain.position_ids)


def test_split_width_feeds_a_few_long_chunks_apart():
    assert engine.split_width([3] * 14 + [40] * 2) == 3  # 16 x 3 + 2 x 37 columns instead of 16 x 40
    assert engine.split_width([60] * 4 + [80] * 8) == 80  # 9% less work: not worth two cache copies
    assert engine.split_width([0, 0, 5]) == 5


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_observations_fed_in_two_parts_equal_one_feed(policy, decode):
    """Chunks of very different lengths (most short, two long: error messages beside short replies)
    fed as one wide feed or as a narrow feed of all rows plus the long rows' rest alone: the same
    next-token logits, positions, and logits after one more token on the same cache."""
    model, processor, _, samples = policy
    prompts = [build_prompt(processor, Registry.from_dict(REGISTRY), sample) for sample in samples]
    rng = random.Random(0)
    chunks = [[rng.randrange(5, 200) for _ in range(40 if i in (3, 9) else 3)] for i in range(4 * len(samples))]
    assert engine.split_width([len(chunk) for chunk in chunks]) == 3
    results = []
    for compact in (False, True):
        with torch.no_grad():
            slots = None if decode == "dynamic" else max(p["input_ids"].shape[1] for p in prompts) + 16
            cache, attention, deltas, logits, _ = engine.prefill(model, prompts, max_cache_len=slots)
            groups = torch.arange(len(samples)).repeat_interleave(4)
            engine.select_rows(cache, groups)
            rows = [engine._Row(engine.Trajectory(None, 0, [], [], [], [], None)) for _ in chunks]
            batch = engine._Batch(rows, cache, attention[groups], deltas[groups], logits[groups])
            for row, chunk in zip(rows, chunks):
                row.pending = list(chunk)
            engine.continue_after_observations(model, batch, compact)
            after = batch.logits.clone()
            engine.feed(model, batch, [[7]] * len(rows))
            results.append((after, [row.positions for row in batch.rows], batch.logits, batch.rows == rows))
    (plain, plain_positions, plain_next, _), (split, split_positions, split_next, in_order) = results
    assert in_order
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=0)
    assert split_positions == plain_positions
    torch.testing.assert_close(split_next, plain_next, atol=1e-5, rtol=0)


def split_runs(traj):
    runs, start = [], 0
    for j in range(1, len(traj.loss_mask) + 1):
        if j == len(traj.loss_mask) or traj.loss_mask[j] != traj.loss_mask[start]:
            runs.append((traj.loss_mask[start], traj.response_ids[start:j]))
            start = j
    return runs


def test_layout_mask_and_truncated_observations(policy):
    model, processor, _, samples = policy
    tokenizer = processor.tokenizer
    env = make_env(tokenizer, words=200, obs_token_budget=64)  # every reply is cut
    torch.manual_seed(6)
    trajectories = rollout(model, processor, samples, env, RolloutConfig(group_size=4, max_turns=2,
                                                                         max_turn_tokens=16))
    observed = 0
    for traj in trajectories:
        runs = split_runs(traj)
        sampled = [tokenizer.decode(ids) for flag, ids in runs if flag == 1]
        assert sampled == [turn.text for turn in traj.turns]
        assert sum(traj.loss_mask) == sum(len(ids) for flag, ids in runs if flag == 1)
        assert all(lp == 0.0 for lp, m in zip(traj.sample_logprobs, traj.loss_mask) if not m)
        assert all(lp <= 0.0 for lp in traj.sample_logprobs)
        observations = [tokenizer.decode(ids) for flag, ids in runs if flag == 0]
        calls = [turn for turn in traj.turns if turn.result is not None]
        assert len(observations) == len(calls)
        for text, turn in zip(observations, calls):
            before = SEARCH_CLOSE_LAYOUT[0]
            if turn.text.endswith("<|im_end|>"):
                before = before[len("<|im_end|>"):]
            assert text == before + turn.result.observation + SEARCH_CLOSE_LAYOUT[1]
            assert len(tokenizer(turn.result.observation)["input_ids"]) <= 64
            if turn.action.kind == "search" and not turn.result.error:
                assert "tokens truncated" in turn.result.observation
                observed += 1
    assert observed > 0


def test_stop_reasons_from_teacher_forced_turns(policy):
    _, processor, env, samples = policy
    search = "<search> Bar-Reader@@Read_Bar: value </search>"
    cases = {("<answer> 7 </answer>",): "answered", (search, "<answer> 7 </answer>"): "answered",
             (search, search): "max_turns", (search, "no action here"): "invalid"}
    for texts, reason in cases.items():
        traj = trajectory_from_texts(processor, samples[0], env, list(texts), max_turns=1)
        assert traj.stop_reason == reason, texts
        assert traj.num_turns == len(texts)
    with pytest.raises(ValueError, match="after the trajectory ended"):
        trajectory_from_texts(processor, samples[0], env, ["<answer> 7 </answer>", search])


def test_teacher_forced_layout_equals_rollout_layout(policy):
    _, processor, env, _ = policy
    trajectories = two_groups(policy, 7)
    tokenizer = processor.tokenizer
    compared = 0
    for traj in trajectories:
        runs = [ids for flag, ids in split_runs(traj) if flag == 1]
        if any(tokenizer(turn.text, add_special_tokens=False)["input_ids"] != ids
               for turn, ids in zip(traj.turns, runs)):
            continue  # a sampled turn that is not the canonical tokenization of its text
        forced = trajectory_from_texts(processor, traj.sample, env, [t.text for t in traj.turns], max_turns=2)
        if traj.stop_reason == "budget":
            continue
        assert forced.prompt_ids == traj.prompt_ids
        assert forced.response_ids == traj.response_ids
        assert forced.loss_mask == traj.loss_mask
        assert forced.choice_positions == traj.choice_positions
        assert forced.stop_reason == traj.stop_reason
        compared += 1
    assert compared > 0


def test_group_prompt_is_prefilled_once(policy):
    model, processor, env, samples = policy
    batch_sizes = []
    hook = model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: batch_sizes.append(kwargs["grid_thw"].shape[0]), with_kwargs=True)
    try:
        rollout(model, processor, samples[:2], env, RolloutConfig(group_size=8, max_turns=1, max_turn_tokens=8))
    finally:
        hook.remove()
    assert batch_sizes == [2]  # one vision pass over the 2 unique images, not 16


def test_garbage_policy_never_breaks_the_loop(policy):
    _, processor, _, samples = policy
    model = build_policy(processor, "tiny", seed=1)  # random weights
    env = make_env(processor.tokenizer, words=30, obs_token_budget=64)
    torch.manual_seed(8)
    cfg = RolloutConfig(group_size=4, max_turns=3, max_turn_tokens=12, max_response_tokens=150, temperature=1.5)
    trajectories = rollout(model, processor, samples, env, cfg)
    assert len(trajectories) == 16
    for traj in trajectories:
        assert traj.stop_reason in ("answered", "max_turns", "budget", "invalid")
        assert len(traj.response_ids) <= cfg.max_response_tokens
        assert traj.num_turns <= cfg.max_turns + 1
        for turn in traj.turns:
            if turn.action.kind == "invalid" and turn.result is not None:
                assert turn.result.error == turn.action.error and "Error" in turn.result.observation
        if traj.stop_reason == "budget":  # an observation is never appended partially
            assert traj.loss_mask[-1] == 1
    assert any(t.stop_reason == "budget" for t in trajectories)
    assert sampled_logprob_error(model, processor, trajectories, 1.5) < 1e-4


def test_text_only_causal_lm_runs_the_same_rollout(policy, tmp_path):
    _, processor, env, samples = policy
    tokenizer = processor.tokenizer
    save_policy(build_policy(tokenizer, "tiny", seed=2), tokenizer, tmp_path)
    model, tokenizer = load_policy(tmp_path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    torch.manual_seed(9)
    text_samples = [dataclasses.replace(s, prompt=None) for s in samples[:2]]
    cfg = RolloutConfig(group_size=3, max_turns=2, max_turn_tokens=12, max_response_tokens=200)
    trajectories = rollout(model, tokenizer, text_samples, env, cfg)
    assert all(t.stop_reason for t in trajectories)
    assert all(t.position_ids.shape == (1, len(t.prompt_ids) + len(t.response_ids)) for t in trajectories)
    assert all(torch.equal(t.position_ids[0], torch.arange(t.position_ids.shape[1])) for t in trajectories)
    assert "pixel_values" not in collate(trajectories, tokenizer)
    assert sampled_logprob_error(model, tokenizer, trajectories, 1.0) < 1e-4


def test_top_p_samples_only_the_nucleus_and_records_full_logprobs():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, -1)
    cfg = RolloutConfig(top_p=0.6)
    torch.manual_seed(10)
    tokens, logprobs = engine.sample_tokens(logits, torch.tensor([3]), cfg)  # token 3 suppressed
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 reaches 0.6: the nucleus is {0, 1}
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.02
    full = torch.log(probs[:3] / probs[:3].sum())  # suppression renormalises, top-p does not
    assert torch.allclose(logprobs, full[tokens], atol=1e-6)
    # an exact tie: 0.5 already reaches top_p 0.5, so the nucleus is token 0 alone
    tokens, _ = engine.sample_tokens(torch.tensor([0.5, 0.25, 0.25]).log().expand(2000, -1),
                                     torch.tensor([], dtype=torch.long), RolloutConfig(top_p=0.5))
    assert torch.all(tokens == 0)


def test_observation_glue_follows_a_thinking_template(policy):
    _, processor, _, _ = policy
    thinking = processor.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    assert thinking != processor.chat_template
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = thinking
    try:
        before, after = observation_glue(tokenizer)
    finally:
        tokenizer.chat_template = original
    assert (before, after) == ("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_upstream_edit_rules(policy):
    tokenizer = policy[1].tokenizer
    reasoning = " ".join(f"step{i}" for i in range(300))
    search = "<search> Bar-Reader@@Read_Bar: value </search>"
    # generation 0: the last 200 tokens of the reasoning before the first <search>, up to the last </search>
    kept = maestro.upstream_edit(f"<think>{reasoning}</think>\n{search} trailing words", 0, tokenizer)
    assert kept.endswith(search) and "trailing" not in kept
    tail = kept[:-len(search)]
    assert len(tokenizer(tail, add_special_tokens=False)["input_ids"]) <= 200 + 1 and tail.endswith("</think>\n")
    assert "step299" in tail and "step0 " not in tail
    assert maestro.upstream_edit(f"{search} more {search}", 0, tokenizer) == f"{search} more {search}"
    assert maestro.upstream_edit("<think>no call</think><answer> 7 </answer>", 0, tokenizer) is None
    # generation 1: reasoning up to the first </think> dropped; the last search block, else the last answer
    two = "<think>a</think> <search> X@@Y: 1 </search> <search> X@@Y: 2 </search> <answer> 3 </answer>"
    assert maestro.upstream_edit(two, 1, tokenizer) == "<search> X@@Y: 2 </search>"
    assert maestro.upstream_edit("<think>a</think><answer> 3 </answer>", 1, tokenizer) == "<answer> 3 </answer>"
    assert maestro.upstream_edit("<think>a</think> nothing", 1, tokenizer) is None
    # later generations: the last answer block, else the last search block, else the raw generation
    assert maestro.upstream_edit(two, 2, tokenizer) == "<answer> 3 </answer>"
    assert maestro.upstream_edit("<search> X@@Y: 1 </search>", 3, tokenizer) == "<search> X@@Y: 1 </search>"
    assert maestro.upstream_edit("<think><answer> 9 </answer></think> plain", 2, tokenizer) is maestro.KEEP_RAW
    # what upstream acted on: an answer block ends the episode; a call runs only where no <answer> is
    # written at all (a kept reasoning tail that names the tag ends it unanswered); a missing </search> is added
    act = maestro.upstream_action_text
    assert act(f"<think>a</think>{search} x {search.replace('value', 'other')}") == f"<think>a</think>{search}"
    assert act("<think>I will answer in <answer> tags</think> " + search) == ""
    assert act(f"{search} <answer> 3 </answer>") == "<answer> 3 </answer>"
    assert act("<search> X@@Y: 1<|im_end|>") == "<search> X@@Y: 1<|im_end|></search>"
    assert act("no action at all") == ""


def test_a_stop_string_completed_by_a_merged_token_still_parses(monkeypatch):
    """With tags that are not single tokens (as in Qwen's vocabulary), the token that completes
    </answer> may carry text past it ('>.'): the turn stops there and its action is what precedes."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import policy
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(policy.PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Call an expert with search, then answer. <answer> 7 </answer>."] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=policy.SPECIAL_TOKENS, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", extra_special_tokens=dict(policy.VISION_TOKENS))
    tokenizer.chat_template = policy.CHAT_TEMPLATE
    turn = tokenizer("<answer> 7 </answer>.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(turn)[-1] == ">."  # the merge this test is about
    traj = scripted_turn(monkeypatch, tokenizer, turn)
    assert traj.stop_reason == "answered" and traj.turns[0].action.answer == "7"
    assert traj.response_ids == turn  # every sampled token stays in the trajectory


def scripted_turn(monkeypatch, tokenizer, turn):
    """One rollout of a text-only tiny policy whose sampler draws the ids of `turn` (with the
    model's own log-probs) and then whatever the model samples."""
    script, sample_tokens = list(turn), engine.sample_tokens

    def scripted(logits, suppressed, cfg):
        tokens, _ = sample_tokens(logits, suppressed, cfg)
        tokens = torch.tensor([script.pop(0)] * logits.shape[0]) if script else tokens
        all_logprobs = torch.log_softmax(logits.float().index_fill(1, suppressed, float("-inf")), -1)
        return tokens, all_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    monkeypatch.setattr(engine, "sample_tokens", scripted)
    model = build_policy(tokenizer, "tiny", seed=0)
    sample = dataclasses.replace(make_samples()[0], images=(), prompt=None)
    [traj] = rollout(model, tokenizer, [sample], make_env(tokenizer), RolloutConfig(group_size=1, max_turn_tokens=40))
    return traj


def test_a_closing_tag_inside_the_reasoning_does_not_end_the_turn(monkeypatch):
    """A thinking model rehearses the format in its reasoning (in a second block too); only a stop
    string outside it ends the turn."""
    for text in ["<think> first </think> <think> I will write <answer> 9 </answer> later </think> <answer> 7 </answer>",
                 "<think> I will write <answer> 9 </answer> later </think> <answer> 7 </answer>"]:
        tokenizer = build_tokenizer([text, "Call an expert with search, then answer."] * 20, vocab_size=400)
        traj = scripted_turn(monkeypatch, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        assert traj.stop_reason == "answered" and traj.turns[0].action.answer == "7"
        assert tokenizer.decode(traj.response_ids) == text
    # a thinking template opens <think> itself: the turn starts inside the reasoning
    tokenizer = build_tokenizer([text, "Call an expert with search, then answer."] * 20, vocab_size=400)
    tokenizer.chat_template = tokenizer.chat_template.replace("'<|im_start|>assistant\\n'",
                                                              "'<|im_start|>assistant\\n<think>\\n'")
    assert "<think>" in observation_glue(tokenizer)[1]
    text = text.removeprefix("<think>")
    traj = scripted_turn(monkeypatch, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    assert traj.stop_reason == "answered" and traj.turns[0].action.answer == "7"
    # ... and a turn that never closes it has no action, whatever it writes after its reasoning
    text = "the bar looks like 9 so <answer> 9 </answer><|im_end|>"
    traj = scripted_turn(monkeypatch, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    assert traj.turns[0].action.error == "unclosed_think" and traj.stop_reason != "answered"
    # a demonstration (no reasoning of its own) closes the template's reasoning block at once
    sample = dataclasses.replace(make_samples()[0], images=(), prompt=None)
    demo = trajectory_from_texts(tokenizer, sample, make_env(tokenizer),
                                 ["<search> Bar-Reader@@Read_Bar: value </search>", "<answer> 7 </answer>"])
    assert [t.action.kind for t in demo.turns] == ["search", "answer"] and demo.stop_reason == "answered"
    assert tokenizer.decode(demo.response_ids).startswith("\n</think>\n\n<search>")
    # under upstream's loop only the first turn follows the template's opener (observations are bare user turns)
    env = make_env(tokenizer)
    env.protocol = "upstream"
    call = "<search> Bar-Reader@@Read_Bar: value </search>"
    demo = trajectory_from_texts(tokenizer, sample, env, [call, call, "no block at all"], max_turns=4)
    assert tokenizer.decode(demo.response_ids).count("</think>") == 1 and demo.turns[-1].text.startswith("no block")


def test_a_teacher_forced_trajectory_shows_the_results_it_is_given_one_per_call(policy):
    """Given results go to the calls in order; a turn upstream's loop drops makes no call and takes none."""
    _, processor, _, samples = policy
    env = make_env(processor.tokenizer)
    env.protocol = "upstream"
    call = "<search> Bar-Reader@@Read_Bar: value </search>"
    [given] = make_env(processor.tokenizer, words=5).step([maestro.parse_action(call)], samples[:1])
    turns = ["<think>no call yet</think> hmm", call, "<answer> 7 </answer>"]  # the first is dropped
    traj = trajectory_from_texts(processor, samples[0], env, turns, [given])
    assert traj.turns[0].result is given and traj.stop_reason == "answered"
    assert given.observation in processor.tokenizer.decode(traj.response_ids)
    with pytest.raises(ValueError, match="makes a call and no result is left for it"):
        trajectory_from_texts(processor, samples[0], env, [call, call, "<answer> 7 </answer>"], [given])
    with pytest.raises(ValueError, match=r"1 result\(s\) left over"):
        trajectory_from_texts(processor, samples[0], env, ["<answer> 7 </answer>"], [given])


def test_upstream_layout_teacher_forced(policy):
    """The token layout of upstream's turn loop (spec 1.5): kept turns end with <|im_end|> and are
    followed by a bare user turn holding the reply's last 1000 characters, tags left as they are."""
    _, processor, _, samples = policy
    tokenizer = processor.tokenizer
    registry = Registry.from_dict(REGISTRY)

    class Echo:  # a reply with tags, longer than upstream's 1000-character cut
        def __init__(self, name):
            self.name = name

        def chat(self, text, images=(), system=None, **generation):
            return Reply("x" * 1500 + " the value is <answer>7</answer>", 1, 1, 0.0)

    env = Environment(registry, {name: Echo(name) for name in registry.experts}, Services({}), tokenizer,
                      protocol="upstream")
    turns = ["<think>plan</think> <search> Bar-Reader@@Read_Bar: value </search> junk after the call",
             "<think>no action here</think> hmm",  # generation 1 without a block: dropped, the turn is used up
             "<think>read it</think> <answer> 7 </answer>"]
    traj = engine.trajectory_from_texts(processor, samples[0], env, turns)
    text = tokenizer.decode(traj.response_ids)
    reply = "x" * 1500 + " the value is <answer>7</answer>"
    observation = f"<|im_start|>user<information>{reply[-1000:]}</information><|im_end|>"
    assert text == ("<think>plan</think> <search> Bar-Reader@@Read_Bar: value </search><|im_end|>"
                    + observation + "<answer> 7 </answer><|im_end|>")
    assert traj.generations == 3 and traj.num_turns == 2 and traj.stop_reason == "answered"
    masked = tokenizer.decode([t for t, m in zip(traj.response_ids, traj.loss_mask) if not m])
    assert masked == observation
    # a turn that is only its action block ends at <|im_end|> too; the first call is the one executed
    first, second = "<search> Bar-Reader@@Read_Bar: one </search>", "<search> Shape-Counter@@Count_Shapes: two </search>"
    traj = engine.trajectory_from_texts(processor, samples[0], env, [f"{first} {second}", "<answer> 7 </answer>"])
    assert tokenizer.decode(traj.response_ids) == f"{first} {second}<|im_end|>" + observation + "<answer> 7 </answer><|im_end|>"
    assert (traj.turns[0].action.model, traj.turns[0].action.skill) == ("Bar-Reader", "Read_Bar")
    expert_at = traj.choice_positions[0][0]
    assert tokenizer.decode(traj.response_ids[expert_at:expert_at + 3]).startswith("Bar")
    # a vision token spelled in a reply stays text: a real id would be an image without pixels in training
    env.backends["Bar-Reader"] = type("Pad", (), {"name": "Bar-Reader", "chat": lambda self, *a, **k: Reply(
        "look at <|image_pad|> and <|vision_start|>", 1, 1, 0.0)})()
    traj = engine.trajectory_from_texts(processor, samples[0], env, ["<search> Bar-Reader@@Read_Bar: value </search>",
                                                                     "<answer> 7 </answer>"])
    assert not set(traj.response_ids) & set(suppressed_ids(processor)) and "image_pad|>" in tokenizer.decode(traj.response_ids)
    # a malformed call is answered with an error observation and the episode goes on, as upstream's loop did
    traj = engine.trajectory_from_texts(processor, samples[0], env, ["<search> Bar-Reader: value </search>",
                                                                     "<answer> 7 </answer>"])
    assert traj.stop_reason == "answered" and traj.turns[0].result.error == "missing_separator"
    assert traj.turns[0].action.kind == "invalid" and traj.choice_positions == []
    # a first turn that answers without a call is dropped: nothing is left, and nothing breaks
    traj = engine.trajectory_from_texts(processor, samples[0], env, ["<answer> 7 </answer>"])
    assert traj.response_ids == [] and traj.generations == 1 and traj.stop_reason == "invalid"
