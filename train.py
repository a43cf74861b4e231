"""Train the orchestration policy with GRPO: multi-turn rollouts against frozen experts and skills.

    python train.py                                       # the toy-world main job (defaults below)
    python train.py --steps 50 --out out/quick            # any default can be overridden
    python train.py --config configs/train_paper.json --model /path/to/Qwen3-VL-4B --train_data a.parquet
    torchrun --standalone --nproc_per_node 4 train.py --config configs/train_paper.json --parallel fsdp ...
    python train.py --resume auto --out out/toy           # continue exactly from the latest checkpoint

The main job builds a tiny Qwen3-VL from scratch (toyworld.build_toy_policy), teaches it the action
format by supervised warm-up on demonstrations with uniformly random (expert, skill) pairs, then
lets GRPO learn which pair to call for which question, and finally evaluates it on the test split
against the closed-form baselines (random pair, best fixed pair, oracle routing).

One GRPO step, per rank (train_step):
  1. take this rank's slice of the step's prompts x group_size rows and roll them out;
  2. score every trajectory (scoring.compute_reward); all-gather rewards, group advantages;
  3. ppo_epochs optimizer steps, each over length-sorted micro-batches with gradient
     accumulation, normalized by the token count of the whole step on all ranks, so the
     update does not depend on world size or micro-batch size (update_policy).

Config: the DEFAULTS block below, then a JSON file (--config), then --key value flags, each
checked against DEFAULTS (unknown keys are an error) and parsed to the default's type.
"""
import contextlib
import datetime
import json
import os
import random
import resource
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import eval as evaluation
import toyworld
from data import load_samples
from experts import OpenAIChatClient, Services, build_backends
from grpo import demonstration_loss, group_advantages, grpo_loss
from maestro import (Environment, RolloutConfig, choice_candidates, collate, compute_logprobs, response_text, rollout,
                     trajectory_from_texts)
from policy import load_policy
from registry import Registry
from scoring import RewardConfig, compute_reward


# -----------------------------------------------------------------------------------------------
# Defaults: the toy-world main job (README, "The toy world": the measured reason for each).
# The paper setting (Qwen3-VL-4B, lr 1e-6, weight decay 0.01, no barrier) is configs/train_paper.json.
DEFAULTS = dict(
    # run
    out="out/toy",             # checkpoints in out/ckpt_NNNNNN, final policy in out/final, results in out/results.json
    seed=0,
    resume="",                 # "" | a checkpoint directory | "auto" (latest under out)
    threads=0,                 # torch CPU threads (0: leave torch's default)
    # policy
    model="",                  # "" builds the toy policy from scratch; else an HF directory or Hub id
    policy_size="toy",         # from-scratch policy size when model is "" ("tiny" | "toy" | "small")
    # world: registry, data, experts
    registry="configs/toy.json",
    train_data="",             # "" = toy world train split; else comma-separated JSONL / parquet paths
    test_data="",              # "" = toy world test split
    prompt="stored",           # stored: a data row's own prompt when it has one (what a checkpoint was trained
                               # with), else the registry's; registry: always the registry's (registry swaps)
    num_train=8000,            # toy samples generated for training
    num_test=256,              # test samples used for evaluation (first N)
    experts="toy",             # toy: in-process toy experts | http: the registry's URLs (or expert_url)
    expert_url="",             # with experts=http: one OpenAI-compatible URL for every expert
    stratify=True,             # equal numbers of prompts per family (Sample.family) in every step
    # rollout
    prompts_per_step=32,       # global, across ranks
    group_size=8,
    protocol="ours",           # the turn loop: ours | upstream (the released checkpoint's: maestro.upstream_edit)
    max_turns=0,               # expert calls per trajectory; 0: the registry prompt's max_calls
    max_turn_tokens=24,        # a toy call is ~10 tokens; a runaway turn costs every row of the batch a decode step
    max_response_tokens=256,
    temperature=1.0,
    format_penalty=-1.0,
    reward="strict",           # strict: our matching of the policy's last answer; upstream: upstream's per-source
                               # scorers on the whole response, observations included (gameable: README)
    # supervised warm-up (format) on random-pair demonstrations
    sft_steps=1200,            # cap; 0 skips the warm-up
    sft_batch=64,              # global demonstrations per step
    sft_pool=2048,             # distinct demonstrations, drawn with replacement each step
    sft_lr=1e-3,
    sft_eval_every=50,
    sft_stop_valid=0.98,       # stop once the sampled format-valid rate reaches this (the anchor keeps training it)
    # GRPO
    steps=600,
    lr=1e-3,
    weight_decay=0.0,
    beta1=0.9,
    beta2=0.999,
    grad_clip=1.0,             # 0 disables clipping (the norm is still logged)
    ppo_epochs=1,              # optimizer steps per rollout batch; 1 = on-policy (ratio exactly 1)
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=3.0,             # 0 disables the dual clip
    loss_agg="token-mean",     # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    scale_by_std=True,         # False: Dr. GRPO advantages (centred only)
    drop_zero_adv=True,        # skip rows with zero advantage (no signal; saves the forward/backward)
    barrier=0.01,              # routing log-barrier weight (0.01 fixed collapse; 0.003 weak, 0.05 too strong)
    barrier_on_failures=True,  # scale each rollout's barrier by its group's failure rate: explore where the policy
                               # fails, let solved questions sharpen (a constant barrier capped the top share)
    kl_coef=0.0,               # > 0 adds a frozen reference model and a KL loss
    kl_kind="k3",
    anchor=1.0,                # weight of the demonstrations' NLL, routing choices left out, added to each GRPO step
                               # (keeps the request and answer copying GRPO erodes; 0: pure GRPO)
    anchor_batch=16,           # global demonstrations per GRPO step for the anchor
    micro_batch_tokens=16384,  # padded tokens per micro-batch (rows are length-sorted)
    # evaluation and stopping
    eval_every=10,
    eval_n=256,                # test questions in the periodic sampled evaluation
    goal="auto",               # stop early at this sampled accuracy; "auto": toy goal from baselines + 0.03; "": never
    time_budget_s=600.0,       # wall-clock cap of the GRPO phase (0: none)
    eval_greedy=False,         # final evaluation: greedy instead of sampled
    # checkpoints
    save_every=50,
    keep_checkpoints=2,
    # parallelism and precision
    device="auto",             # auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cuda | cpu
    dtype="auto",              # compute dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32;
                               # parameters, gradients and AdamW state stay float32, log-softmax is float32
    parallel="ddp",            # ddp | fsdp (FSDP2 fully_shard per decoder layer and vision block)
    grad_checkpointing=False,  # activation checkpointing of the decoder layers (recompute in backward)
    dist_timeout_s=3600,       # process-group timeout: the longest any rank waits for the others in a collective
)


def parse_value(key, text, default):
    """A CLI or JSON value as the type of DEFAULTS[key]."""
    kind = type(default)
    if kind is bool:
        if isinstance(text, bool):
            return text
        if str(text).lower() in ("1", "true", "yes", "on"):
            return True
        if str(text).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {key!r}: expected a boolean (true/false), got {text!r}")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: expected a {kind.__name__} like {default!r}, got {text!r}") from None


def parse_config(argv):
    """DEFAULTS <- JSON file given by --config <- --key value / --key=value flags."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: expected --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"flag {arg} has no value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    cfg = dict(DEFAULTS)
    overrides = []
    for key, value in pairs:
        if key == "config":
            with open(value) as f:
                overrides = list(json.load(f).items()) + overrides
        else:
            overrides.append((key, value))
    for key, value in overrides:
        if key not in DEFAULTS:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(DEFAULTS)}")
        cfg[key] = parse_value(key, value, DEFAULTS[key])
    if cfg["loss_agg"] not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(f"config key 'loss_agg': unknown mode {cfg['loss_agg']!r}")
    if cfg["parallel"] not in ("ddp", "fsdp"):
        raise ValueError(f"config key 'parallel': expected ddp or fsdp, got {cfg['parallel']!r}")
    if cfg["protocol"] not in ("ours", "upstream"):
        raise ValueError(f"config key 'protocol': expected ours or upstream, got {cfg['protocol']!r}")
    if cfg["reward"] not in ("strict", "upstream"):
        raise ValueError(f"config key 'reward': expected strict or upstream, got {cfg['reward']!r}")
    if cfg["prompt"] not in ("stored", "registry"):
        raise ValueError(f"config key 'prompt': expected stored or registry, got {cfg['prompt']!r}")
    if cfg["device"] not in ("auto", "cuda", "cpu"):
        raise ValueError(f"config key 'device': expected auto, cuda or cpu, got {cfg['device']!r}")
    if cfg["dtype"] not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"config key 'dtype': expected auto, bfloat16 or float32, got {cfg['dtype']!r}")
    return cfg


# -----------------------------------------------------------------------------------------------
# Distributed plumbing: every collective goes through these so world size 1 needs no process group.

class World:
    """This process's place in the job (rank, world size, device, compute dtype) and the collectives."""

    def __init__(self, device="auto", dtype="auto", timeout_s=3600):
        self.rank = int(os.environ.get("RANK", 0))
        self.size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("config key 'device': cuda was asked for but torch sees no CUDA device")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        self.dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
                      "float32": torch.float32}[dtype]
        if cuda:
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            # NCCL's watchdog aborts a collective after `timeout`; ranks wait in collectives while
            # another finishes its rollout or evaluation shard, so this bounds the slowest expert stall
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.master = self.rank == 0

    def sum(self, values):
        """Element-wise sum over ranks of a list of numbers -> list of floats."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value):
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.size > 1:
            dist.barrier()


def is_fsdp(model):
    return hasattr(model, "unshard") and hasattr(model, "reshard")


def unwrap(model):
    """The HF model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return getattr(model, "module", model)


def wrap_model(model, cfg, world):
    """DDP (default) or FSDP2 around `model`; the model itself when world size is 1.

    Parameters stay float32 (the optimizer's master copy). FSDP2 gathers them in the compute dtype
    and reduces gradients in float32 (MixedPrecisionPolicy); DDP and a single process compute under
    autocast (see `autocast`). Every micro-batch runs the vision tower on every rank (collate's
    blank image), so no parameter is ever unused and DDP needs no unused-parameter search."""
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if world.size == 1:
        return model
    if cfg["parallel"] == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(world.device.type, (world.size,))
    precision = MixedPrecisionPolicy(param_dtype=world.dtype, reduce_dtype=torch.float32)
    inner = model.model
    blocks = list(getattr(inner, "language_model", inner).layers)
    if hasattr(inner, "visual"):
        blocks += list(inner.visual.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    return model


PROMPT_TOKENS = 2048  # assumed prompt length (system prompt + image tokens) for the KV-cache estimate
EVAL_BATCH = 32       # questions per evaluation rollout batch (eval.evaluate's batch_size)


def memory_estimate(num_params, text_config, cfg, world_size, dtype_bytes=2):
    """Per-GPU memory in GiB of a training config, from the parameter count and the text config.

    Exact: float32 parameters (4 B each), float32 gradients (4 B) and AdamW's two moments (8 B),
    all divided over ranks by FSDP2, replicated by DDP; FSDP2's accumulation without a reduction per
    micro-batch holds unsharded float32 gradients (its reduce dtype); the rollout holds the full parameters
    in the compute dtype (FSDP2 gathers them, DDP's autocast caches the casts). Estimates: the KV
    cache of the larger of a rank's rollout rows and an evaluation batch, each PROMPT_TOKENS +
    max_response_tokens long; training activations of one micro-batch (saved layer inputs with
    checkpointing, else ~12 x hidden + 3 x intermediate values per layer and token) and its float32
    log-probs over the vocabulary (~12 B per predicted token and vocabulary entry, at most half the
    micro-batch's tokens predicted). Returns {item: GiB, "certain": parameters + gradients + AdamW state,
    "total": the larger of the rollout phase and the update phase}."""
    gib, shards = 2 ** 30, world_size if cfg["parallel"] == "fsdp" else 1
    t = text_config
    per_token_kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes
    rows = max(cfg["prompts_per_step"] * cfg["group_size"] // world_size, 1, EVAL_BATCH)
    layer_values = 12 * t.hidden_size + 3 * t.intermediate_size
    per_token_act = (t.num_hidden_layers * t.hidden_size + layer_values if cfg["grad_checkpointing"]
                     else t.num_hidden_layers * layer_values) * dtype_bytes
    plan = {"parameters": 4 * num_params / shards / gib, "gradients": 4 * num_params / shards / gib,
            "adamw_state": 8 * num_params / shards / gib,
            "accumulated_gradients": 4 * num_params / gib if shards > 1 else 0.0,  # FSDP2 keeps them in reduce_dtype
            "rollout_parameters": dtype_bytes * num_params / gib,
            "kv_cache": rows * (PROMPT_TOKENS + cfg["max_response_tokens"]) * per_token_kv / gib,
            "activations": cfg["micro_batch_tokens"] * per_token_act / gib,
            "logits": cfg["micro_batch_tokens"] / 2 * t.vocab_size * 12 / gib}
    plan["certain"] = plan["parameters"] + plan["gradients"] + plan["adamw_state"]
    # the phases do not overlap: gradients are freed after each optimizer step, the cache after each rollout
    rollout = plan["parameters"] + plan["adamw_state"] + plan["rollout_parameters"] + plan["kv_cache"]
    update = plan["certain"] + plan["accumulated_gradients"] + plan["activations"] + plan["logits"]
    plan["total"] = max(rollout, update)
    return plan


def check_memory(plan, capacity_gib):
    """Refuse (ValueError) a memory_estimate whose exact part (parameters, gradients, AdamW state)
    cannot fit in capacity_gib; return a warning when the whole estimate exceeds it, else ""."""
    summary = ", ".join(f"{k} {v:.1f}" for k, v in plan.items())
    if plan["certain"] > capacity_gib:
        raise ValueError(f"this config cannot fit: parameters, gradients and AdamW state alone need "
                         f"{plan['certain']:.1f} GiB per GPU, the GPU has {capacity_gib:.1f} GiB ({summary}); "
                         f"use --parallel fsdp and/or more GPUs")
    if plan["total"] > capacity_gib:
        return (f"warning: estimated {plan['total']:.1f} GiB per GPU > {capacity_gib:.1f} GiB ({summary}); "
                f"lower micro_batch_tokens, turn grad_checkpointing on, or add GPUs")
    return ""


@contextlib.contextmanager
def gradient_sync(model, enabled):
    """Backward passes inside accumulate gradients locally unless `enabled`: only the last backward
    of an optimizer step reduces them over ranks (DDP no_sync; FSDP2 set_requires_gradient_sync)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        yield
    elif enabled or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield


@contextlib.contextmanager
def full_params(model):
    """Yield the module to sample from. FSDP2: gather the full parameters once and keep them,
    so the rollout issues no collectives and ranks may stop decoding at different steps."""
    if not is_fsdp(model):
        yield unwrap(model)
        return
    # every sharded block, not only the root: otherwise a block would all-gather at its first
    # forward, and a rank that samples alone (evaluation on rank 0) would wait for the others
    groups = [m for m in model.modules() if is_fsdp(m)]
    for group in groups:
        group.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for group in groups:
            group.reshard()
        model.set_reshard_after_forward(True)


def autocast(world):
    """Matmuls in the compute dtype (world.dtype); a no-op in float32."""
    if world.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(world.device.type, dtype=world.dtype)


# -----------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, step), so a resumed run sees exactly the same prompts.

def prompts_for_step(samples, step, cfg):
    """The step's global list of prompts (len prompts_per_step). Stratified: the same number from
    each family, drawn afresh every step. Otherwise: epochs of seeded permutations, in order."""
    n = cfg["prompts_per_step"]
    families = sorted({s.family for s in samples if s.family is not None})
    if cfg["stratify"] and families:
        if n % len(families):
            raise ValueError(f"prompts_per_step={n} is not a multiple of the {len(families)} families "
                             f"{families}; change it or pass --stratify false")
        rng, per = np.random.default_rng([cfg["seed"], step]), n // len(families)
        chosen = []
        for family in families:
            pool = [s for s in samples if s.family == family]
            chosen += [pool[i] for i in rng.choice(len(pool), per, replace=len(pool) < per)]
        return chosen
    chosen, orders = [], {}
    for position in range(step * n, (step + 1) * n):
        epoch, i = divmod(position, len(samples))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([cfg["seed"], epoch]).permutation(len(samples))
        chosen.append(samples[orders[epoch][i]])
    return chosen


def rank_slice(n, world):
    """This rank's contiguous share [lo, hi) of n global rows."""
    if n % world.size:
        raise ValueError(f"{n} rows cannot be split evenly over {world.size} ranks; make "
                         "prompts_per_step * group_size (and sft_batch) a multiple of the world size")
    per = n // world.size
    return world.rank * per, (world.rank + 1) * per


# -----------------------------------------------------------------------------------------------
# One training step

def plan_micro_batches(lengths, max_tokens):
    """Split rows into micro-batches of at most max_tokens padded tokens (rows x longest row),
    after sorting by length so rows of similar length share a micro-batch (little padding).
    Returns lists of row indexes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    plan, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            plan.append(current)
            current = []
        current.append(i)
    if current:
        plan.append(current)
    return plan


def micro_batches(trajectories, rows, cfg, world, processor):
    """Collated micro-batches over `rows` (indexes into trajectories), on the model's device,
    padded with zero-weight repeats so every rank runs the same number of forward/backward passes,
    each through the vision tower (DDP and FSDP2 collectives must match). Yields (batch, row
    indexes, weight)."""
    lengths = [len(trajectories[i].prompt_ids) + len(trajectories[i].response_ids) for i in rows]
    plan = [[rows[j] for j in mb] for mb in plan_micro_batches(lengths, cfg["micro_batch_tokens"])]
    count = int(world.max(len(plan)))
    weights = [1.0] * len(plan)
    filler = plan[-1] if plan else [0]  # a rank with nothing to learn still joins the collectives
    plan += [filler] * (count - len(plan))
    weights += [0.0] * (count - len(weights))
    blank = world.size > 1  # one process has nobody to keep in step with
    return [(collate([trajectories[i] for i in mb], processor, world.device, blank), mb, w)
            for mb, w in zip(plan, weights)]


def rows_to_train(advantages, barrier_weights, trajectories, cfg, with_kl):
    """Row indexes the update must run. A row with advantage 0 has exactly zero policy-gradient
    loss, so drop_zero_adv skips it, unless it still carries a KL term or a routing-barrier term
    (a group where every rollout failed has advantage 0 and barrier weight 1). Skipping changes
    nothing but the cost: every normalizer counts all rows."""
    def contributes(i):
        if advantages[i] != 0 or with_kl:
            return True
        barrier = cfg["barrier"] > 0 and bool(trajectories[i].choice_positions)
        return barrier and (barrier_weights is None or float(barrier_weights[i]) > 0)
    return [i for i in range(len(trajectories)) if not cfg["drop_zero_adv"] or contributes(i)]


def update_policy(model, optimizer, trajectories, advantages, processor, cfg, world,
                  candidates=None, ref_model=None, anchor_demos=(), barrier_weights=None):
    """ppo_epochs optimizer steps of the clipped GRPO loss on this rank's trajectories.

    advantages: (len(trajectories),). The loss of every micro-batch is normalized by the token
    (and choice) counts of the whole step on all ranks and multiplied by the world size (DDP and
    FSDP average gradients), so the summed gradient equals that of one process on the global batch.
    barrier_weights: (len(trajectories),) multipliers of each rollout's barrier term, or None.
    anchor_demos: demonstrations whose NLL, routing choices left out, is added with weight
    cfg["anchor"] (demonstration_nll). Gradients are reduced over ranks once per optimizer step.
    Returns metrics averaged over the step's tokens on all ranks.
    """
    kinds = ("expert", "skill")
    local = [sum(sum(t.loss_mask) for t in trajectories), len(trajectories)]
    local += [sum(kind == k for t in trajectories for _, kind in t.choice_positions) for k in kinds]
    num_tokens, num_rows, *num_choices = world.sum(local)
    norms = {"tokens": num_tokens, "rows": num_rows, **dict(zip(kinds, num_choices))}
    use_barrier = cfg["barrier"] > 0 and candidates is not None
    rows = rows_to_train(advantages, barrier_weights, trajectories, cfg, ref_model is not None)
    batches = micro_batches(trajectories, rows, cfg, world, processor)

    def forward(net, batch, with_choices=False):
        with autocast(world):
            return compute_logprobs(net, batch, cfg["temperature"], candidates if with_choices else None)

    old, ref = [], []
    if cfg["ppo_epochs"] > 1 or ref_model is not None:
        with torch.no_grad():
            for batch, _, _ in batches:
                if cfg["ppo_epochs"] > 1:
                    old.append(forward(model, batch)["logprobs"].float())
                if ref_model is not None:
                    ref.append(forward(ref_model, batch)["logprobs"].float())

    sums = Counter()
    grad_norms, anchor_nll = [], 0.0
    model.train()
    for epoch in range(cfg["ppo_epochs"]):
        for j, (batch, mb, weight) in enumerate(batches):
            rows_of = lambda values: torch.tensor([float(values[i]) for i in mb], device=world.device)  # noqa: E731
            with gradient_sync(model, j == len(batches) - 1 and not anchor_demos):  # DDP decides at forward time
                out = forward(model, batch, use_barrier)
                loss, stats = grpo_loss(out, batch, rows_of(advantages), norms, cfg, old[j] if old else None, ref[j]
                                        if ref else None, None if barrier_weights is None else rows_of(barrier_weights))
                (loss * weight * world.size).backward()
            n = batch["num_tokens"] * weight
            sums["tokens"] += n
            sums["loss"] += loss.item() * weight
            sums["kl_ref"] += float(stats.pop("kl_ref", 0.0)) * weight
            for key in ("clipfrac_high", "clipfrac_low", "clipfrac_dual", "approx_kl"):
                sums[key] += float(stats[key]) * n
            if epoch == 0:  # training vs sampling log-probs: large gaps mean a rollout/training mismatch
                gap = torch.where(batch["loss_mask"][:, 1:].bool(), (out["logprobs"].detach().float()
                                                                     - batch["old_logprobs"][:, 1:]).abs(), 0.0)
                sums["logprob_gap"] += float(gap.sum()) * weight
                sums["gap_tokens"] += n
        if anchor_demos:
            anchor_nll += demonstration_nll(model, anchor_demos, processor, cfg, world,
                                            cfg["anchor"], skip_choices=True)[0] / cfg["ppo_epochs"]
        grad_norms.append(clip_gradients(model, cfg["grad_clip"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)
    totals = dict(zip(keys, world.sum([sums[k] for k in keys])))
    tokens = max(totals.get("tokens", 0.0), 1.0)
    metrics = {k: totals[k] / tokens for k in ("clipfrac_high", "clipfrac_low", "clipfrac_dual", "approx_kl")
               if k in totals}
    metrics["logprob_gap"] = totals.get("logprob_gap", 0.0) / max(totals.get("gap_tokens", 0.0), 1.0)
    metrics["loss"] = totals.get("loss", 0.0) / cfg["ppo_epochs"]
    if ref_model is not None:
        metrics["kl_ref"] = totals.get("kl_ref", 0.0) / tokens
    if anchor_demos:
        metrics["anchor_nll"] = anchor_nll  # averaged over all ranks' tokens already
    metrics["grad_norm"] = grad_norms[-1]
    metrics["train_tokens"] = num_tokens
    metrics["train_rows"] = num_rows
    metrics["micro_batches"] = len(batches)
    real, padded = world.sum([sum(float(b["attention_mask"].sum()) for b, _, w in batches if w),
                              sum(b["attention_mask"].numel() for b, _, w in batches if w)])
    metrics["padding_fraction"] = 1.0 - real / padded if padded else 0.0
    metrics["seq_tokens"] = real  # non-pad tokens through the training forward, all ranks
    return metrics


def clip_gradients(model, max_norm):
    """Clip to max_norm (0: no clipping) and return the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def trajectory_summary(traj, reward, info):
    """The picklable facts about one trajectory that the metrics need."""
    calls, errors = [], []
    for turn in traj.turns:
        error = (turn.result.error if turn.result else "") or turn.action.error
        if error:
            errors.append(error)
        if turn.action.kind == "search" and turn.result is not None and turn.result.expert:
            calls.append((turn.result.expert, turn.result.skill))
    return {"reward": reward, "correct": info["correct"], "format_ok": info["format_ok"],
            "turns": traj.num_turns, "stop": traj.stop_reason, "calls": calls, "errors": errors,
            "first_pair": calls[0] if calls else None,
            "source": traj.sample.data_source,  # the same key as eval.py's by_source (route/toy_bar/...)
            "tokens": len(traj.response_ids)}


def rollout_metrics(summaries, num_pairs):
    """Reward, accuracy, format, turns, calls per expert / skill, errors by kind, and the
    routing-collapse metrics per source: share of the most used first (expert, skill) pair and
    the entropy of that pair distribution normalized by log(number of advertised pairs)."""
    n = max(len(summaries), 1)
    m = {"reward": sum(s["reward"] for s in summaries) / n,
         "accuracy": sum(s["correct"] for s in summaries) / n,
         "format_valid": sum(s["format_ok"] for s in summaries) / n,
         "turns": sum(s["turns"] for s in summaries) / n,
         "response_tokens": sum(s["tokens"] for s in summaries) / n}
    experts, skills, errors, stops = Counter(), Counter(), Counter(), Counter()
    by_source = defaultdict(Counter)
    for s in summaries:
        for expert, skill in s["calls"]:
            experts[expert] += 1
            skills[skill] += 1
        errors.update(s["errors"])
        stops[s["stop"]] += 1
        if s["first_pair"]:
            by_source[s["source"]]["@@".join(s["first_pair"])] += 1
    m.update({f"calls/expert/{k}": v for k, v in sorted(experts.items())})
    m.update({f"calls/skill/{k}": v for k, v in sorted(skills.items())})
    m.update({f"errors/{k}": v for k, v in sorted(errors.items())})
    m.update({f"stop/{k}": v for k, v in sorted(stops.items())})
    for source, counts in sorted(by_source.items()):
        route = evaluation.routing_collapse(counts, num_pairs)
        m[f"route/{source}/top_share"] = route["max_pair_share"]
        m[f"route/{source}/top_pair"] = route["top_pair"]
        m[f"route/{source}/entropy"] = route["pair_entropy"]
    return m


def train_step(model, optimizer, prompts, env, processor, cfg, world, rollout_cfg, reward_cfg,
               candidates=None, ref_model=None, num_pairs=1, anchor_demos=()):
    """One GRPO step on the global prompt list `prompts` (the same on every rank).
    Returns the step's metrics (identical on every rank)."""
    t0 = time.perf_counter()
    G = rollout_cfg.group_size
    lo, hi = rank_slice(len(prompts) * G, world)  # rows of one group are contiguous
    if lo % G == 0 and hi % G == 0:  # whole groups: each prompt is prefilled once
        samples, local_cfg = prompts[lo // G:hi // G], rollout_cfg
    else:  # a group split over ranks (e.g. 1 prompt x 8 on 4 GPUs): one row per repeated prompt
        samples, local_cfg = [prompts[i // G] for i in range(lo, hi)], replace(rollout_cfg, group_size=1)
    model.eval()
    with torch.no_grad(), full_params(model) as sampler, autocast(world):
        trajectories = rollout(sampler, processor, samples, env, local_cfg)
    t_rollout = time.perf_counter() - t0

    rewards, summaries = [], []
    for traj in trajectories:
        text = response_text(traj, env.tokenizer) if reward_cfg.scorer == "upstream" else None
        reward, info = compute_reward([t.text for t in traj.turns], [t.action for t in traj.turns],
                                      [t.result.error if t.result else "" for t in traj.turns],
                                      traj.sample.ground_truths, traj.sample.data_source, reward_cfg, text)
        rewards.append(reward)
        summaries.append(trajectory_summary(traj, reward, info))
    gathered = world.gather((rewards, summaries))
    all_rewards = [r for rs, _ in gathered for r in rs]
    all_summaries = [s for _, ss in gathered for s in ss]
    advantages, zero_var = group_advantages(torch.tensor(all_rewards), G, scale_by_std=cfg["scale_by_std"])
    barrier_weights = None
    if cfg["barrier_on_failures"]:  # 1 - the fraction of the group's rollouts that answered correctly
        correct = torch.tensor([float(s["correct"]) for s in all_summaries]).view(-1, G)
        barrier_weights = (1.0 - correct.mean(dim=1)).repeat_interleave(G)[lo:hi]

    t1 = time.perf_counter()
    metrics = update_policy(model, optimizer, trajectories, advantages[lo:hi], processor, cfg, world,
                            candidates, ref_model, anchor_demos, barrier_weights)
    t_update = time.perf_counter() - t1
    metrics.update(rollout_metrics(all_summaries, num_pairs))
    metrics["zero_var_groups"] = zero_var
    metrics["time_rollout"] = t_rollout
    metrics["time_update"] = t_update
    metrics["step_time"] = time.perf_counter() - t0
    metrics["tokens_per_s"] = metrics["seq_tokens"] / max(t_update, 1e-9)
    metrics["peak_mem_mb"] = peak_memory_mb(world)
    return metrics


def demonstration_nll(model, trajectories, processor, cfg, world, scale=1.0, skip_choices=False):
    """Backpropagate scale x the NLL of the loss_mask tokens of teacher-forced demonstrations,
    averaged over the tokens of all ranks (same normalization and masking as the GRPO loss), and
    return that NLL. skip_choices leaves out the first token of every expert and skill name: the
    routing choice, which the GRPO anchor must leave to the reward. Its last backward reduces the
    gradients over ranks (it is always the last of an optimizer step). Returns (NLL, tokens counted)."""
    rows = list(range(len(trajectories)))
    num_tokens = world.sum([sum(sum(t.loss_mask) - skip_choices * len(t.choice_positions)
                                for t in trajectories)])[0]
    model.train()
    total = 0.0
    batches = micro_batches(trajectories, rows, cfg, world, processor)
    for j, (batch, _, weight) in enumerate(batches):
        with gradient_sync(model, j == len(batches) - 1), autocast(world):  # DDP decides at forward time
            logp = compute_logprobs(model, batch, 1.0)["logprobs"]
            loss = demonstration_loss(logp, batch, num_tokens, skip_choices)
            (loss * scale * weight * world.size).backward()
        total += loss.item() * weight
    return world.sum([total])[0], num_tokens


def sft_step(model, optimizer, trajectories, processor, cfg, world):
    """One supervised step on teacher-forced demonstrations (demonstration_nll, then the optimizer)."""
    nll, num_tokens = demonstration_nll(model, trajectories, processor, cfg, world)
    grad_norm = clip_gradients(model, cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"nll": nll, "grad_norm": grad_norm, "tokens": num_tokens}


def peak_memory_mb(world):
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -----------------------------------------------------------------------------------------------
# Checkpoints: HF policy dir + optimizer + trainer state, written to a temporary dir then renamed.

def checkpoint_dirs(out):
    return sorted(Path(out).glob("ckpt_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))


def full_state_dict(model):
    """The full (unsharded) model state dict on every rank (FSDP2 gathers), or None for plain/DDP."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_policy_dir(model, processor, path, world):
    state = full_state_dict(model)  # collective: every rank
    if world.master:
        unwrap(model).save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)


def save_checkpoint(model, optimizer, processor, cfg, world, step):
    """out/ckpt_{step:06d}/{policy/, optimizer.pt, trainer_state.pt, config.json}; atomic rename."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    out = Path(cfg["out"])
    final = out / f"ckpt_{step:06d}"
    tmp = out / f".tmp_ckpt_{step:06d}"
    if world.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    save_policy_dir(model, processor, tmp / "policy", world)
    optim_state = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = world.gather(rng_state())
    if world.master:
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({"step": step, "rng": rng, "world_size": world.size}, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if final.exists():  # saving the same step again (after a resume): swap, then drop the old one
            old = out / f".old_ckpt_{step:06d}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for stale in checkpoint_dirs(out)[:-cfg["keep_checkpoints"]] if cfg["keep_checkpoints"] > 0 else []:
            shutil.rmtree(stale)
    world.barrier()
    return final


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # plain values, so torch.load(weights_only=True) reads it
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def load_optimizer(model, optimizer, path, world):
    """Rank 0 reads the full optimizer state and broadcasts it; FSDP2 ranks keep their shards.
    Parameters that never had a gradient have no saved state (strict=False)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(path, map_location="cpu", weights_only=True) if world.master else {}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=world.size > 1, strict=False))


def resolve_resume(cfg):
    if cfg["resume"] != "auto":
        return Path(cfg["resume"])
    found = checkpoint_dirs(cfg["out"])
    if not found:
        raise FileNotFoundError(f"--resume auto: no checkpoint (ckpt_NNNNNN) under {cfg['out']}")
    return found[-1]


class MetricsLog:
    """Append-only JSONL, one flushed line per record, written by rank 0."""

    def __init__(self, path, world, resume_step=None):
        self.file = None
        if not world.master:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = []  # drop a half-written last line and anything after the checkpoint
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("phase") == "sft" or record.get("step", 0) <= resume_step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def progress(step, total, width=20):
    done = int(width * step / max(total, 1))
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total}"


def console_line(step, total, m):
    routes = [k for k in m if k.endswith("/top_share")]
    top = max((m[k] for k in routes), default=0.0)
    return (f"{progress(step, total)} reward {m['reward']:+.3f} acc {m['accuracy']:.3f} "
            f"valid {m['format_valid']:.3f} turns {m['turns']:.2f} zero-var {m['zero_var_groups']} "
            f"clip {m.get('clipfrac_high', 0):.3f}/{m.get('clipfrac_low', 0):.3f} kl {m.get('approx_kl', 0):.2e} "
            f"gnorm {m['grad_norm']:.3f} top-pair {top:.2f} {m['tokens_per_s']:.0f} tok/s "
            f"{m['step_time']:.2f}s {m['peak_mem_mb']:.0f}MB")


# -----------------------------------------------------------------------------------------------
# The job

def build_world(cfg, processor):
    """(registry, environment, train samples, test samples) from the config."""
    registry = Registry.load(cfg["registry"])
    if cfg["experts"] == "toy":
        backends = toyworld.toy_backends(registry)
    elif cfg["experts"] == "http":
        overrides = {}
        if cfg["expert_url"]:
            overrides = {name: OpenAIChatClient(name, cfg["expert_url"], e.model, e.api_key_env, e.generation,
                                                e.timeout, e.max_retries, image_encoding=e.image_encoding)
                         for name, e in registry.experts.items()}
        backends = build_backends(registry, overrides)
    else:
        raise ValueError(f"config key 'experts': expected toy or http, got {cfg['experts']!r}")
    env = Environment(registry, backends, Services(registry.services), getattr(processor, "tokenizer", processor),
                      protocol=cfg["protocol"])
    if cfg["train_data"]:
        train = load_samples(cfg["train_data"].split(","), use_stored_prompt=cfg["prompt"] == "stored")
    else:
        train = toyworld.make_samples("train", cfg["num_train"], cfg["seed"])
    if cfg["test_data"]:
        test = load_samples(cfg["test_data"].split(","), use_stored_prompt=cfg["prompt"] == "stored")[:cfg["num_test"]]
    else:
        test = toyworld.make_samples("test", cfg["num_test"], cfg["seed"])
    return registry, env, train, test


def evaluate_sharded(model, processor, samples, env, rollout_cfg, world, **kwargs):
    """eval.evaluate with every rank rolling out its shard of the samples (FSDP2: all ranks hold
    full parameters meanwhile); the same results on every rank."""
    model.eval()
    with torch.no_grad(), full_params(model) as sampler, autocast(world):
        return evaluation.evaluate(sampler, processor, samples, env, rollout_cfg, n=1, world=world, **kwargs)


class DemonstrationPool:
    """A fixed pool of sft_pool random-pair demonstrations (toyworld.demo_turns on train samples),
    each built on first use: building one costs as much as training on it."""

    def __init__(self, processor, registry, env, train, cfg):
        self.processor, self.registry, self.env, self.train, self.cfg = processor, registry, env, train, cfg
        self.built = {}

    def __getitem__(self, j):
        if j not in self.built:
            rng = random.Random(f"sft/{self.cfg['seed']}/{j}")
            sample = self.train[rng.randrange(len(self.train))]
            turns = toyworld.demo_turns(sample, self.registry, rng, self.env)
            self.built[j] = trajectory_from_texts(self.processor, sample, self.env, turns)
        return self.built[j]

    def batch(self, phase, step, lo, hi):
        """This rank's demonstrations [lo, hi) of a step; demonstration i depends on (seed, phase,
        step, i) only, so a global batch is the same for any world size."""
        return [self[random.Random(f"{phase}/{self.cfg['seed']}/{step}/{i}").randrange(self.cfg["sft_pool"])]
                for i in range(lo, hi)]


def run_sft(model, processor, pool, env, test, cfg, world, rollout_cfg, log):
    """Supervised warm-up on random-pair demonstrations until the format is learned."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    lo, hi = rank_slice(cfg["sft_batch"], world)
    eval_cfg = replace(rollout_cfg, group_size=1)
    for step in range(1, cfg["sft_steps"] + 1):
        demos = pool.batch("sft", step, lo, hi)
        record = {"phase": "sft", "step": step, **sft_step(model, optimizer, demos, processor, cfg, world)}
        if step % cfg["sft_eval_every"] == 0 or step == cfg["sft_steps"]:
            results = evaluate_sharded(model, processor, test[:min(cfg["eval_n"], 128)], env, eval_cfg, world)
            record.update(format_valid=results["format_valid_rate"], accuracy=results["accuracy"])
        log.write(record)
        if world.master and (step % 10 == 0 or "format_valid" in record):
            print(f"sft {progress(step, cfg['sft_steps'])} nll {record['nll']:.3f}"
                  + (f" valid {record['format_valid']:.3f} acc {record['accuracy']:.3f}" if "format_valid" in record else ""),
                  flush=True)
        if record.get("format_valid", 0.0) >= cfg["sft_stop_valid"]:
            break


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nDefaults (override with --key value):\n"
              + "\n".join(f"  --{key} {value!r}" for key, value in DEFAULTS.items()))
        return
    try:
        cfg = parse_config(argv)
    except (ValueError, OSError) as error:  # a bad flag or config file: a message, not a traceback
        sys.exit(f"train.py: {error}")
    try:
        world = World(cfg["device"], cfg["dtype"], cfg["dist_timeout_s"])
    except ValueError as error:
        sys.exit(f"train.py: {error}")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out"])
    if world.master:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(cfg, indent=2), flush=True)

    # ---- policy, environment, data
    resume_dir = resolve_resume(cfg) if cfg["resume"] else None
    torch.manual_seed(cfg["seed"] + world.rank)
    random.seed(cfg["seed"] + world.rank)
    np.random.seed(cfg["seed"] + world.rank)
    if resume_dir is not None:
        model, processor = load_policy(resume_dir / "policy")
    elif cfg["model"]:
        model, processor = load_policy(cfg["model"])
    else:
        model, processor = toyworld.build_toy_policy(Registry.load(cfg["registry"]), cfg["policy_size"], cfg["seed"])
    if world.device.type == "cuda":
        plan = memory_estimate(sum(p.numel() for p in model.parameters()), model.config.get_text_config(), cfg,
                               world.size, torch.finfo(world.dtype).bits // 8)
        try:
            warning = check_memory(plan, torch.cuda.get_device_properties(world.device).total_memory / 2 ** 30)
        except ValueError as error:
            sys.exit(f"train.py: {error}")
        if warning and world.master:
            print(warning, flush=True)
    model.to(world.device)
    registry, env, train, test = build_world(cfg, processor)
    rollout_cfg = RolloutConfig(group_size=cfg["group_size"],
                                max_turns=cfg["max_turns"] or registry.prompt_options["max_calls"],
                                max_turn_tokens=cfg["max_turn_tokens"], max_response_tokens=cfg["max_response_tokens"],
                                temperature=cfg["temperature"], protocol=cfg["protocol"])
    reward_cfg = RewardConfig(format_penalty=cfg["format_penalty"], scorer=cfg["reward"])
    candidates = choice_candidates(processor, registry, world.device)
    num_pairs = len(registry.advertised_experts()) * len(registry.advertised_skills())
    goal = cfg["goal"]
    if goal == "auto":
        # + 0.03, about 1.5 standard errors of a 256-question sampled accuracy: the final
        # evaluation draws fresh rollouts and should clear the goal too, not just this estimate
        goal = toyworld.analytic_baselines(registry)["goal"] + 0.03 if not cfg["train_data"] else None
    goal = float(goal) if goal not in ("", None) else None

    model = wrap_model(model, cfg, world)
    state = None if resume_dir is None else torch.load(resume_dir / "trainer_state.pt", weights_only=True)
    log = MetricsLog(out / "metrics.jsonl", world, resume_step=None if state is None else state["step"])

    # ---- supervised warm-up (skipped when resuming: checkpoints are taken after it)
    pool = DemonstrationPool(processor, registry, env, train, cfg)
    if state is None and cfg["sft_steps"] > 0:
        run_sft(model, processor, pool, env, test, cfg, world, rollout_cfg, log)

    # ---- GRPO (the KL reference, if any, is the policy GRPO starts from, kept in out/reference)
    ref_model = None
    if cfg["kl_coef"] > 0:
        if state is None:
            save_policy_dir(model, processor, out / "reference", world)
            world.barrier()
        ref_model = load_policy(out / "reference", dtype=world.dtype, device=world.device)[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"])
    start = 0
    if state is not None:
        if state["world_size"] != world.size:
            raise ValueError(f"{resume_dir} was written by {state['world_size']} ranks; resume it with as many "
                             f"(this run has {world.size}) so every rank gets its RNG state back")
        load_optimizer(model, optimizer, resume_dir / "optimizer.pt", world)
        set_rng_state(state["rng"][world.rank])
        start = state["step"]
        if world.master:
            print(f"resumed from {resume_dir} at step {start}", flush=True)
    else:
        save_checkpoint(model, optimizer, processor, cfg, world, 0)

    eval_cfg = replace(rollout_cfg, group_size=1)
    t_start = time.perf_counter()
    step = start
    while step < cfg["steps"]:
        prompts = prompts_for_step(train, step, cfg)
        anchor_demos = pool.batch("anchor", step, *rank_slice(cfg["anchor_batch"], world)) if cfg["anchor"] > 0 else ()
        m = train_step(model, optimizer, prompts, env, processor, cfg, world, rollout_cfg, reward_cfg,
                       candidates, ref_model, num_pairs, anchor_demos)
        step += 1
        log.write({"phase": "grpo", "step": step, **m})
        if world.master:
            print(console_line(step, cfg["steps"], m), flush=True)
        stop = cfg["time_budget_s"] > 0 and time.perf_counter() - t_start > cfg["time_budget_s"]
        if cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0:
            results = evaluate_sharded(model, processor, test[:cfg["eval_n"]], env, eval_cfg, world)
            log.write({"phase": "eval", "step": step, "accuracy": results["accuracy"],
                       "format_valid": results["format_valid_rate"],
                       **{f"route/{src}/top_share": r["max_pair_share"] for src, r in results["by_source"].items()}})
            if world.master:
                print(f"eval step {step}: sampled accuracy {results['accuracy']:.3f} "
                      f"valid {results['format_valid_rate']:.3f}" + (f" (stop at {goal:.3f})" if goal else ""), flush=True)
            stop = stop or (goal is not None and results["accuracy"] >= goal)
        stop = bool(world.broadcast(stop))
        if step % cfg["save_every"] == 0 or step == cfg["steps"] or stop:
            save_checkpoint(model, optimizer, processor, cfg, world, step)
        if stop:
            break

    # ---- final policy and evaluation
    save_policy_dir(model, processor, out / "final", world)
    final_cfg = replace(eval_cfg, greedy=cfg["eval_greedy"])
    results = evaluate_sharded(model, processor, test, env, final_cfg, world, baselines=True, registry=registry)
    if world.master:
        results["train"] = {"grpo_steps": step, "config": cfg}
        evaluation.write_results(results, out)
    world.barrier()


if __name__ == "__main__":
    main()
    if dist.is_initialized():  # here, not in main(): a caller that runs main() twice keeps its group
        dist.destroy_process_group()
