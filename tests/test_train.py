"""train.py: config, data order, micro-batching, the update's invariances, SFT, exact resume, and
(through tests/dist_check.py under torchrun) DDP / FSDP2 equivalence with one process."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from collections import Counter
from dataclasses import replace

import eval as evaluation
import toyworld
import train
from grpo import StepBatch, UpdateConfig, demonstration_nll, plan_micro_batches, sft_step, update_policy
from logprobs import collate, compute_logprobs
from parallel import Ranks, check_memory, memory_estimate, wrap_model
from policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
TOY = train.read_config([])  # the toy main job's settings: DEFAULTS under configs/train_toy.json


def update(model, optimizer, trajectories, advantages, processor, cfg, barrier_weights=None):
    return update_policy(model, optimizer, StepBatch(trajectories, advantages, barrier_weights), UpdateConfig.of(cfg),
                         Ranks(), processor)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads fighting other processes
    make these small forwards 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ config and data order

def test_config_defaults_preset_file_and_flags(tmp_path):
    """DEFAULTS (the paper's setting) <- the toy world's preset <- --config FILE <- flags."""
    preset = json.loads((ROOT / "configs" / "train_toy.json").read_text())
    assert TOY == {**train.DEFAULTS, **preset} and TOY["world"] == "toy" and TOY["lr"] == 1e-3
    paper = train.read_config(["--world", "data"])
    assert paper == {**train.DEFAULTS, "world": "data"}
    assert (paper["lr"], paper["weight_decay"], paper["group_size"], paper["barrier"], paper["kl_coef"],
            paper["anchor"], paper["parallel"]) == (1e-6, 0.01, 8, 0.0, 0.0, 0.0, "fsdp")
    # the toy job computes in float32 on any device (on one H200, in bf16 it learned and stepped slower:
    # README "On GPUs"); the paper setting in bf16 where CUDA is (auto)
    assert TOY["dtype"] == "float32" and paper["dtype"] == "auto"
    assert json.loads((ROOT / "configs" / "eval_toy.json").read_text())["dtype"] == "float32"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 1e-6, "steps": 7, "stratify": False, "goal": 0.5}))
    cfg = train.read_config(["--config", str(config), "--steps", "9", "--barrier=0.02", "--dtype", "float32"])
    assert cfg["lr"] == 1e-6 and cfg["steps"] == 9 and cfg["barrier"] == 0.02  # file and flags over the preset
    assert cfg["stratify"] is False and cfg["dtype"] == "float32" and cfg["goal"] == "0.5"
    assert cfg["group_size"] == TOY["group_size"] and cfg["sft_steps"] == preset["sft_steps"]
    with pytest.raises(ValueError, match=r"unknown config key 'lr_rate'; valid keys: world, out, seed"):
        train.read_config(["--lr_rate", "1"])
    with pytest.raises(ValueError, match="'steps': expected a int like 380, got 'many'"):
        train.read_config(["--steps", "many"])
    with pytest.raises(ValueError, match="boolean"):
        train.read_config(["--stratify", "maybe"])
    with pytest.raises(ValueError, match="'parallel': expected one of ddp, fsdp, got 'zero'"):
        train.read_config(["--parallel", "zero"])
    second = tmp_path / "d.json"
    second.write_text(json.dumps({"steps": 8}))
    assert train.read_config(["--config", str(config), "--config", str(second)])["steps"] == 8
    for text, message in (("[1, 2]", "c.json: expected a JSON object of config keys, got list"),
                          ('{"steps": 7,}', "c.json: invalid JSON"),
                          ('{"steps": 1.9}', "'steps': expected a JSON int like 380, got 1.9"),
                          ('{"lr": true}', "'lr': expected a JSON float"),
                          ('{"out": null}', "'out': expected a JSON str")):
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            train.read_config(["--config", str(config)])


def test_prompts_are_a_function_of_seed_and_step_and_stratified():
    samples = toyworld.make_samples("train", 64, seed=0)
    cfg = dict(TOY, prompts_per_step=8)
    a, b = train.prompts_for_step(samples, 3, cfg), train.prompts_for_step(samples, 3, cfg)
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.id for s in a] != [s.id for s in train.prompts_for_step(samples, 4, cfg)]
    assert sorted(s.family for s in a) == sorted(toyworld.FAMILIES * 2)
    with pytest.raises(ValueError, match="multiple of the 4 families"):
        train.prompts_for_step(samples, 0, dict(cfg, prompts_per_step=6))
    # unstratified: epochs of permutations, every sample once per epoch (10 samples, 4 per step)
    few = samples[:10]
    ids = [s.id for step in range(5) for s in train.prompts_for_step(few, step, dict(cfg, prompts_per_step=4,
                                                                                      stratify=False))]
    assert sorted(ids[:10]) == sorted(s.id for s in few) == sorted(ids[10:20])


def test_length_sorted_micro_batches_respect_budget_and_limit_padding():
    rng = random.Random(0)
    lengths = [rng.randint(200, 400) for _ in range(256)]
    plan = plan_micro_batches(lengths, 4096)
    assert sorted(i for mb in plan for i in mb) == list(range(256))
    assert all(len(mb) * max(lengths[i] for i in mb) <= 4096 for mb in plan)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
    assert 1 - sum(lengths) / padded < 0.05  # unsorted chunks of this data pad ~25%
    assert plan_micro_batches([5000], 100) == [[0]]  # a row longer than the budget goes alone


def test_routing_collapse_metrics():
    collapsed = evaluation.routing_collapse(Counter({"A@@x": 4}), num_pairs=4)
    assert collapsed == {"max_pair_share": 1.0, "top_pair": "A@@x", "pair_entropy": 0.0}
    spread = evaluation.routing_collapse(Counter({f"{e}@@{s}": 1 for e in "AB" for s in "xy"}), num_pairs=4)
    assert spread["max_pair_share"] == 0.25 and spread["pair_entropy"] == pytest.approx(1.0)


def test_training_metrics_are_the_evaluation_summary_flattened(demos):
    """One record per trajectory and one summary: metrics.jsonl gets route/<data source>/... and the
    overall numbers from training rollouts and periodic evaluations alike (eval.summarize)."""
    processor, registry, env, trajectories = demos
    records = [evaluation.record(t, train.RewardConfig(), env) for t in trajectories]
    results = evaluation.summarize(records, registry)
    metrics = evaluation.flat_results(results)
    sources = {k.split("/")[1] for k in metrics if k.startswith("route/")}
    assert sources == set(results["by_source"]) and all(key.startswith("toy_") for key in sources)
    assert metrics["accuracy"] == results["accuracy"] and metrics["mean_reward"] == results["mean_reward"]
    calls = Counter(r["first_pair"] for r in records)
    assert sum(v for k, v in metrics.items() if k.startswith("calls/expert/")) == sum(calls.values())
    for source, summary in results["by_source"].items():
        assert metrics[f"route/{source}/max_pair_share"] == summary["max_pair_share"]


# ------------------------------------------------------------------ the update

def _delta(tiny_dir, demos, cfg, advantages, barrier_weights=None):
    processor, _, _, trajectories = demos
    model, _ = load_policy(tiny_dir)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    metrics = update(model, torch.optim.SGD(model.parameters(), lr=1.0), trajectories, advantages, processor, cfg,
                     barrier_weights)
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}, metrics


def test_barrier_weights_of_rows_reach_their_choices(tiny_dir, demos):
    """Weight 0 for every row is the update without a barrier, weight 1 the plain barrier, and
    weights per row follow their rows through length-sorted micro-batches."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.5, 0.5, 2.0, -1.0, -0.75])
    cfg = dict(TOY, grad_clip=0.0, barrier=0.5, micro_batch_tokens=250)
    off, _ = _delta(tiny_dir, demos, dict(cfg, barrier=0.0), advantages)
    plain, _ = _delta(tiny_dir, demos, cfg, advantages)
    for weight, expected in ((0.0, off), (1.0, plain)):
        delta, _ = _delta(tiny_dir, demos, cfg, advantages, torch.full((8,), weight))
        assert all(torch.allclose(delta[k], expected[k], atol=1e-7, rtol=1e-4) for k in delta)
    # half the rows at weight 1, half at 0: the barrier's effect is the sum of the two halves
    first, second = torch.tensor([1.0] * 4 + [0.0] * 4), torch.tensor([0.0] * 4 + [1.0] * 4)
    a, _ = _delta(tiny_dir, demos, cfg, advantages, first)
    b, _ = _delta(tiny_dir, demos, cfg, advantages, second)
    for k in a:
        torch.testing.assert_close(a[k] + b[k] - off[k], plain[k], atol=1e-6, rtol=1e-4)
    assert max((a[k] - b[k]).abs().max() for k in a) > 1e-6


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_update_does_not_depend_on_micro_batch_size(tiny_dir, demos, agg):
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.5, 0.5, 2.0, -1.0, -0.75])
    cfg = dict(TOY, grad_clip=0.0, barrier=0.01, loss_agg=agg)
    whole, m_whole = _delta(tiny_dir, demos, dict(cfg, micro_batch_tokens=10**6), advantages)
    split, m_split = _delta(tiny_dir, demos, dict(cfg, micro_batch_tokens=250), advantages)
    assert m_whole["micro_batches"] == 1 and m_split["micro_batches"] >= 4
    assert m_split["loss"] == pytest.approx(m_whole["loss"], abs=1e-6)
    for k in whole:
        assert torch.allclose(whole[k], split[k], atol=1e-7, rtol=1e-4), k
    assert max(d.abs().max() for d in whole.values()) > 1e-3  # something was learned


def test_zero_advantages_and_observation_tokens_give_no_policy_gradient(tiny_dir, demos):
    # all-zero advantages and no barrier: nothing to learn, every parameter unchanged
    cfg = dict(TOY, grad_clip=0.0, barrier=0.0, drop_zero_adv=False)
    delta, m = _delta(tiny_dir, demos, cfg, torch.zeros(8))
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())
    # the loss normalizer counts only sampled tokens: observations and prompts are not in it
    _, _, _, trajectories = demos
    assert m["train_tokens"] == sum(sum(t.loss_mask) for t in trajectories)
    assert m["train_tokens"] < sum(len(t.response_ids) for t in trajectories)


def test_drop_zero_adv_is_a_pure_speed_up(tiny_dir, demos):
    """Skipping rows with zero advantage runs fewer micro-batches and changes nothing else: the
    normalizers count every row, and a zero-advantage row whose group failed keeps its barrier."""
    advantages = torch.tensor([1.0, 0.0, 0.0, -1.5, 0.0, 2.0, 0.0, -0.75])
    weights = torch.tensor([0.5, 1.0, 0.0, 0.5, 0.0, 0.5, 1.0, 0.5])  # rows 1, 6: all-failed groups
    cfg = dict(TOY, grad_clip=0.0, barrier=0.5, micro_batch_tokens=150)
    for agg in ("token-mean", "seq-mean-token-mean"):
        off, m_off = _delta(tiny_dir, demos, dict(cfg, loss_agg=agg, drop_zero_adv=False), advantages, weights)
        on, m_on = _delta(tiny_dir, demos, dict(cfg, loss_agg=agg, drop_zero_adv=True), advantages, weights)
        assert m_on["micro_batches"] < m_off["micro_batches"]  # rows 2 and 4 were skipped
        assert m_on["loss"] == pytest.approx(m_off["loss"], abs=1e-7)
        for k in off:
            torch.testing.assert_close(on[k], off[k], atol=1e-7, rtol=1e-5)


def test_barrier_reaches_groups_where_every_rollout_failed(tiny_dir, demos):
    """All advantages 0 (every group failed) and failure-scaled barrier weights 1: the update still
    moves the routing choices' probabilities, towards the less likely names."""
    processor, _, _, trajectories = demos
    model, _ = load_policy(tiny_dir)
    batch = collate(trajectories, processor)

    def choice_logprobs():
        with torch.no_grad():
            return compute_logprobs(model, batch, 1.0, with_choices=True)["choice_logprobs"]

    before = choice_logprobs()
    cfg = dict(TOY, grad_clip=0.0, barrier=0.5, drop_zero_adv=True, anchor=0.0)
    update(model, torch.optim.SGD(model.parameters(), lr=0.5), trajectories, torch.zeros(8), processor, cfg,
           torch.ones(8))
    after = choice_logprobs()
    for kind in before:
        assert (after[kind] - before[kind]).abs().max() > 1e-3, kind
        # the barrier raises the mean log-prob of the candidates: the least likely gain
        assert after[kind].mean() > before[kind].mean()


def test_logprob_gap_counts_sampled_tokens_only_and_not_ppo_epochs(tiny_dir, demos):
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.5, 0.5, 2.0, -1.0, -0.75])
    cfg = dict(TOY, grad_clip=0.0, lr=1e-3)
    _, unsampled = _delta(tiny_dir, demos, cfg, advantages)
    assert unsampled["logprob_gap"] == 0.0  # demonstrations were not sampled: nothing to compare
    processor, registry, env, trajectories = demos  # as if each trained token had been drawn at log-prob -1
    drawn = (processor, registry, env, [replace(t, sample_logprobs=[-1.0 if m else 0.0 for m in t.loss_mask])
                                        for t in trajectories])
    _, one = _delta(tiny_dir, drawn, dict(cfg, ppo_epochs=1), advantages)
    _, three = _delta(tiny_dir, drawn, dict(cfg, ppo_epochs=3), advantages)
    assert one["logprob_gap"] > 0.1  # |log p + 1| over the trained tokens
    assert three["logprob_gap"] == pytest.approx(one["logprob_gap"], rel=1e-6)
    # the reported norm is the on-policy epoch's, whatever follows it
    assert three["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6) and three["grad_norm_max"] >= three["grad_norm"]


def test_activation_checkpointing_gives_the_same_update(tiny_dir, demos):
    import warnings
    processor, _, _, trajectories = demos
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.5, 0.5, 2.0, -1.0, -0.75])
    deltas = []
    for checkpointing in (False, True):
        cfg = dict(TOY, grad_clip=0.0, barrier=0.01, grad_checkpointing=checkpointing)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated transformers call on this path
            model = wrap_model(load_policy(tiny_dir)[0], cfg, Ranks())
        assert model.is_activation_checkpointing == checkpointing
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        update(model, torch.optim.SGD(model.parameters(), lr=1.0), trajectories, advantages, processor, cfg)
        deltas.append({k: p.detach() - before[k] for k, p in model.named_parameters()})
    for k in deltas[0]:
        torch.testing.assert_close(deltas[1][k], deltas[0][k], atol=1e-7, rtol=1e-5)


def test_memory_estimate_closed_form_and_refusal():
    from transformers import Qwen3Config
    text = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = dict(TOY, prompts_per_step=4, group_size=8, max_response_tokens=1024, micro_batch_tokens=2048)
    P, gib = 10 ** 9, 2 ** 30
    ddp = memory_estimate(P, text, dict(cfg, parallel="ddp"), 4)
    fsdp = memory_estimate(P, text, dict(cfg, parallel="fsdp"), 4)
    assert ddp["certain"] == pytest.approx(16 * P / gib) and fsdp["certain"] == pytest.approx(16 * P / 4 / gib)
    assert fsdp["accumulated_gradients"] == pytest.approx(4 * P / gib) and ddp["accumulated_gradients"] == 0
    # KV cache: 32 rows (an evaluation batch) x (2048 + 1024) tokens x layers x kv heads x head_dim x (keys +
    # values), keys float32 where the parameters are (DDP: k_norm's float32 weight), bf16 under FSDP2
    assert ddp["kv_cache"] == pytest.approx(32 * 3072 * 2 * 2 * 16 * (4 + 2) / gib)
    assert fsdp["kv_cache"] == pytest.approx(32 * 3072 * 2 * 2 * 16 * (2 + 2) / gib)
    with_kl = memory_estimate(P, text, dict(cfg, parallel="fsdp", kl_coef=0.05), 4)
    assert fsdp["reference_model"] == 0 and with_kl["reference_model"] == pytest.approx(2 * P / gib)
    assert with_kl["total"] == pytest.approx(fsdp["total"] + 2 * P / gib)
    assert check_memory(fsdp, capacity_gib=1000.0) == ""
    assert "warning: estimated" in check_memory(fsdp, capacity_gib=fsdp["certain"] + 0.01)
    with pytest.raises(ValueError, match="cannot fit: parameters, gradients and AdamW state alone need 14.9 GiB"):
        check_memory(ddp, capacity_gib=10.0)


def test_sft_steps_lower_the_demonstration_nll(tiny_dir, demos):
    processor, _, _, trajectories = demos
    model, _ = load_policy(tiny_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = dict(TOY, micro_batch_tokens=1000)
    nll = [sft_step(model, optimizer, trajectories, processor, UpdateConfig.of(cfg), Ranks())["nll"] for _ in range(6)]
    assert all(later < earlier for earlier, later in zip(nll, nll[1:])) and nll[-1] < nll[0] - 1.0, nll


def test_anchor_nll_leaves_out_exactly_the_routing_choices(tiny_dir, demos):
    """The GRPO anchor's loss and gradient equal an independent NLL over the demonstrations'
    policy tokens minus the first token of each expert and skill name."""
    processor, _, _, trajectories = demos
    model, _ = load_policy(tiny_dir)
    cfg = dict(TOY, micro_batch_tokens=500)  # several micro-batches
    nll, _ = demonstration_nll(model, trajectories, processor, UpdateConfig.of(cfg), Ranks(), scale=2.0,
                               skip_choices=True)
    anchored = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    batch = collate(trajectories, processor)
    logp = compute_logprobs(model, batch)["logprobs"]
    keep = batch["loss_mask"][:, 1:].clone()
    skipped = 0
    for r, traj in enumerate(trajectories):
        for position, _, _ in traj.choice_positions:  # logprobs column c scores token c + 1
            column = len(traj.prompt_ids) + position - 1
            assert keep[r, column] == 1
            keep[r, column] = 0
            skipped += 1
    assert skipped == 2 * len(trajectories)  # one expert and one skill name per demonstration
    expected = -(logp * keep).sum() / keep.sum()
    (2.0 * expected).backward()
    assert abs(nll - expected.item()) < 1e-5
    for mine, theirs in zip(anchored, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ the job: checkpoints and exact resume

JOB = ["--sft_steps", "0", "--prompts_per_step", "4", "--group_size", "2", "--max_turns", "1",
       "--max_turn_tokens", "6", "--max_response_tokens", "40", "--eval_every", "0", "--num_train", "32",
       "--num_test", "4", "--save_every", "2", "--drop_zero_adv", "false", "--lr", "1e-2",
       "--kl_coef", "0.1", "--kl_kind", "k1"]  # the KL term gives a gradient even when every reward is -1


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tiny_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["--model", str(tiny_dir), "--out", str(straight), "--steps", "4", *JOB])
    train.main(["--model", str(tiny_dir), "--out", str(resumed), "--steps", "2", *JOB])
    # a save killed midway leaves a hidden temporary dir; a killed logger a half-written line
    (resumed / ".tmp_ckpt_000003").mkdir()
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"phase": "grpo", "step": 3, "rew')
    train.main(["--model", str(tiny_dir), "--out", str(resumed), "--steps", "4", "--resume", "auto", *JOB])

    a, b = _records(straight), _records(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    elapsed = [r["elapsed_s"] for r in a]  # wall seconds since the log opened, record by record
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0] >= 0
    for ra, rb in zip(a, b):
        for key in ("mean_reward", "loss", "kl_ref", "tokens/policy_mean", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert a[-1]["kl_ref"] != 0.0  # the policy moved away from the reference
    wa, wb = load_policy(straight / "final")[0].state_dict(), load_policy(resumed / "final")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in resumed.glob("ckpt_*")) == ["ckpt_000002", "ckpt_000004"]  # keep 2
    saved = json.loads((resumed / "ckpt_000004" / "config.json").read_text())
    assert saved["resume"] == "auto" and saved["steps"] == 4
    assert (straight / "results.json").exists() and "baselines" in json.loads((straight / "results.json").read_text())
    train.main(["--model", str(tiny_dir), "--out", str(straight), "--steps", "2", *JOB])  # fresh, into a used out
    assert [r["step"] for r in _records(straight)] == [1, 2]  # its own records only, not appended to the last run's


def test_the_checkpoint_before_the_first_step_leaves_adamw_fresh(tiny_dir, tmp_path):
    """torch's optimizer-state helper steps a fresh optimizer on zero gradients; AdamW would count
    it and shrink its first real update. Saved before any step, the optimizer stays fresh, and a
    resume from that checkpoint starts from a fresh one too; after a step the state round-trips."""
    model, processor = load_policy(tiny_dir)
    cfg, ranks = dict(TOY, out=str(tmp_path)), Ranks("cpu", "float32", alone=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train.save_checkpoint(model, optimizer, processor, cfg, ranks, 0)
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    resumed = torch.optim.AdamW(model.parameters(), lr=0.1)
    train.load_optimizer(model, resumed, tmp_path / "ckpt_000000" / "optimizer.pt", ranks)
    assert not resumed.state
    model.lm_head.weight.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    train.save_checkpoint(model, optimizer, processor, cfg, ranks, 1)
    train.load_optimizer(model, resumed, tmp_path / "ckpt_000001" / "optimizer.pt", ranks)
    state = resumed.state[model.lm_head.weight]
    assert float(state["step"]) == 1 and torch.equal(state["exp_avg"], optimizer.state[model.lm_head.weight]["exp_avg"])


def test_eval_gate_skips_evaluations_far_from_the_goal(tiny_dir, tmp_path, capsys):
    job = JOB[:-4]  # without the KL term
    job[job.index("--eval_every") + 1] = "1"
    far, near = tmp_path / "far", tmp_path / "near"
    # an untrained policy answers nothing right: training accuracy 0, far below goal - gate
    train.main(["--model", str(tiny_dir), "--out", str(far), "--steps", "3", *job, "--goal", "0.9", "--eval_gate", "0.5"])
    assert [r["phase"] for r in _records(far)] == ["grpo"] * 3
    assert capsys.readouterr().out.count("skipped: training accuracy 0.000") == 3
    # goal 0 is within the gate of any accuracy: the first evaluation runs and meets it
    train.main(["--model", str(tiny_dir), "--out", str(near), "--steps", "3", *job, "--goal", "0", "--eval_gate", "0.5",
                "--stop_evals", "1", "--stop_valid", "0"])
    assert [(r["phase"], r["step"]) for r in _records(near)] == [("grpo", 1), ("eval", 1)]


def test_stop_needs_its_evaluations_in_a_row_and_the_valid_rate(tiny_dir, tmp_path):
    job = JOB[:-4] + ["--goal", "0"]  # goal 0: every evaluation meets the accuracy goal
    job[job.index("--eval_every") + 1] = "1"
    two, valid = tmp_path / "two", tmp_path / "valid"
    train.main(["--model", str(tiny_dir), "--out", str(two), "--steps", "4", *job, "--stop_evals", "2",
                "--stop_valid", "0"])
    assert [(r["phase"], r["step"]) for r in _records(two)] == [("grpo", 1), ("eval", 1), ("grpo", 2), ("eval", 2)]
    # an untrained policy's turns are not format-valid: the valid floor keeps every evaluation from stopping
    train.main(["--model", str(tiny_dir), "--out", str(valid), "--steps", "2", *job, "--stop_evals", "1",
                "--stop_valid", "1"])
    evals = [r for r in _records(valid) if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2] and all(r["format_valid_rate"] < 1 for r in evals)
    with pytest.raises(SystemExit, match="config key 'stop_evals': expected 1 or more, got 0"):
        train.main(["--model", str(tiny_dir), "--out", str(valid), *job, "--stop_evals", "0"])
    with pytest.raises(SystemExit, match="config key 'barrier': .* set barrier 0 with registry_views"):
        train.main(["--model", str(tiny_dir), "--out", str(valid), *job, "--registry_views", "10-99", "--barrier", "0.01"])


# ------------------------------------------------------------------ torchrun, 2 ranks (gloo)

def test_ddp_and_fsdp_match_one_process_and_the_job_runs(tiny_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_check.py"), str(tiny_dir), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # on a hang, kill torchrun and both ranks together
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun timed out (a collective mismatch?):\n" + stderr[-5000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for parallel in ("ddp", "fsdp", "mixed_ddp", "mixed_fsdp"):  # mixed: rank 1's rows have no image
            r = report[parallel]
            assert r["max_abs_diff"] <= 1e-6 * max(1.0, r["max_abs_delta"]), (parallel, r)
            assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)
            assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6)
        assert report["fsdp_step"]["response_tokens"] > 0  # ranks decoded up to 3 and 9 tokens per turn
        assert report["fsdp_step"]["rows"] == 4  # one group of 4, two rows per rank
        assert report["reshard_after_forward"] == {"root": False, "blocks": True}
        assert report["eval"]["sharded"] == report["eval"]["alone"] and report["eval"]["alone"]["questions"] == 5
    records = _records(tmp_path / "job")
    grpo = [r for r in records if r["phase"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3] and all(abs(r["loss"]) < 1e6 for r in grpo)
    assert grpo[-1]["kl_ref"] != 0.0  # the resumed step is measured against the saved reference
    assert any(r["phase"] == "sft" for r in records)
    assert (tmp_path / "job" / "ckpt_000003" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "job" / "final" / "model.safetensors").exists()


def test_torchrun_with_one_process_has_a_process_group_and_wraps_the_model(tiny_dir, tmp_path):
    """nanoGPT's rule: under torchrun, --nproc_per_node 1 too, there is a process group and the model
    is wrapped (so DDP's and FSDP2's CUDA paths run on one GPU: bench.py --gpu); plain python has neither.
    Wrapped, text-only micro-batches still run the vision tower (a blank image): DDP raises at the next
    step when a parameter went unused."""
    script = tmp_path / "wrapped.py"
    script.write_text(f"""
import random, sys
import torch, torch.distributed as dist
from dataclasses import replace
sys.path.insert(0, {str(ROOT)!r})
import toyworld, train
from environment import Environment, demonstration_turns
from experts import Services
from grpo import StepBatch, UpdateConfig, update_policy
from parallel import Ranks, wrap_model
from policy import load_policy
from registry import Registry
from rollout import trajectory_from_texts

base, processor = load_policy({str(tiny_dir)!r})
registry = Registry.load({str(ROOT / "configs" / "toy.json")!r})
env = Environment(registry, toyworld.toy_backends(registry), Services({{}}), processor.tokenizer)
samples = [replace(s, images=()) for s in toyworld.make_samples("train", 4, seed=0)]
rows = [trajectory_from_texts(processor, s, env, *demonstration_turns(s, env, random.Random(0), toyworld.request_of))
        for s in samples]
cfg = dict(train.read_config([]), ppo_epochs=2, barrier=0.0, anchor=0.0)
ranks = Ranks("cpu")
model = wrap_model(base, cfg, ranks)
batch = StepBatch(rows, torch.tensor([1.0, -1.0, 0.5, -0.5]))
update_policy(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, UpdateConfig.of(cfg), ranks, processor)
print(dist.is_initialized(), type(model).__name__)
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               str(script)], env=env, capture_output=True, text=True, timeout=180)
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert launched.stdout.split() == ["True", "DistributedDataParallel"], launched.stderr[-3000:]
    assert plain.stdout.split() == ["False", "Qwen3VLForConditionalGeneration"], plain.stderr[-3000:]
