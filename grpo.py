"""GRPO, from finished trajectories to an optimizer step: group advantages, the clipped policy loss,
KL estimators, the routing log-barrier, and the update that batches trajectories into micro-batches,
recomputes their log-probs (logprobs.py) and accumulates the loss of the whole step.

The loss functions are pure functions of tensors, small enough to check by hand (tests/test_grpo.py
does, against closed forms). Semantics follow verl's core_algos (vanilla PPO loss with dual clip,
token-mean aggregation, k1/k2/k3 KL), with two additions the trainer needs:
  * `num_tokens` / `num_choices`: normalizers for the whole optimizer step, so that summing the
    losses of micro-batches (and of ranks) gives exactly the full-batch loss;
  * `choice_barrier`: a log-barrier on the expert/skill choice distributions, the measured fix
    for routing collapse (README, "The toy world").

Masked positions are removed with torch.where *before* any arithmetic, so an inf or NaN sitting
at a masked position (padding, observation tokens) can reach neither the loss nor the gradient.

The update (`update_policy`, `demonstration_nll`) runs on any number of ranks: every normalizer
counts the whole step on all ranks, so the summed gradient equals one process's on the global batch.
"""
from collections import Counter
from dataclasses import dataclass, fields

import torch

from logprobs import collate, compute_logprobs
from parallel import autocast, clip_gradients, gradient_sync, unwrap

LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: ratio stays finite however far the policy moved
KL_LIMIT = 10.0         # clamp of the k3 estimate, as in verl / OpenRLHF
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards, group_size, eps=1e-6, scale_by_std=True, zero_var_tol=1e-6):
    """GRPO advantages for contiguous groups of `group_size` trajectories.

    rewards: (N,) with N a multiple of group_size; rows [g*G, (g+1)*G) share one prompt.
    Returns (advantages (N,), num_zero_var_groups: int).
      scale_by_std=True : (r - group mean) / (group std + eps), std unbiased (torch default, as verl)
      scale_by_std=False: r - group mean (Dr. GRPO: no question-difficulty weighting)
    A group whose std is below zero_var_tol (all rewards equal, or a group of one) carries no
    learning signal: its advantages are exactly 0 and it is counted in num_zero_var_groups.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards cannot be split into groups "
                         f"of {group_size}; expected a multiple of group_size")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if group_size == 1:
        std = torch.zeros_like(mean)  # torch's unbiased std of one value is NaN
    else:
        std = groups.std(dim=1, keepdim=True)
    adv = groups - mean
    if scale_by_std:
        adv = adv / (std + eps)
    zero_var = std < zero_var_tol  # (num_groups, 1)
    adv = torch.where(zero_var, torch.zeros_like(adv), adv)
    return adv.flatten(), int(zero_var.sum())


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                agg="token-mean", num_tokens=None):
    """PPO clipped surrogate, per token, aggregated to a scalar.

    logp, old_logp, mask: (B, T); advantages: (B,) (one per trajectory) or (B, T).
    clip_low / clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher when unequal).
    dual_clip: for negative advantages the loss is capped at -A * dual_clip (> 1); None disables it.
    agg:
      "token-mean"              sum of token losses / num_tokens (default: mask.sum() of this batch)
      "seq-mean-token-mean"     mean over sequences of each sequence's token mean (a sequence without
                                loss tokens counts as 0, so micro-batch means add up to the batch mean)
      "seq-mean-token-sum-norm" mean over sequences of (sequence token sum / num_tokens), where the
                                constant defaults to T = mask.shape[1] (Dr. GRPO)
    num_tokens: pass the token count of the whole optimizer step (all micro-batches, all ranks) so
    that micro-batch losses add up to the full-batch loss. Only token-mean and the sum-norm
    constant use it.
    Returns (loss scalar, metrics dict of 0-dim tensors: clipfrac_high, clipfrac_low, clipfrac_dual,
    approx_kl = mean(old_logp - logp)) — metrics are over this batch's masked tokens.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"policy_loss: unknown agg {agg!r}; expected one of {AGG_MODES}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (or None), got {dual_clip}")
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp = torch.where(mask, old_logp, zero)
    advantages = torch.where(mask, advantages.to(logp.dtype), zero)

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)  # pessimistic bound
    if dual_clip is not None:
        capped = torch.minimum(losses, -advantages * dual_clip)
        dual_active = (advantages < 0) & (losses > -advantages * dual_clip)
        losses = torch.where(advantages < 0, capped, losses)
    else:
        dual_active = torch.zeros_like(mask)
    loss = aggregate(torch.where(mask, losses, zero), mask, agg, num_tokens)

    with torch.no_grad():  # 0-dim tensors: reading them is the caller's choice (no host sync here)
        n = mask.sum().clamp(min=1)
        metrics = {
            "clipfrac_high": ((ratio > 1.0 + clip_high) & (advantages > 0) & mask).sum() / n,
            "clipfrac_low": ((ratio < 1.0 - clip_low) & (advantages < 0) & mask).sum() / n,
            "clipfrac_dual": (dual_active & mask).sum() / n,
            "approx_kl": torch.where(mask, -log_ratio, zero).sum() / n,
        }
    return loss, metrics


def aggregate(losses, mask, agg, num_tokens=None):
    """Per-token losses (B, T), zero where mask is False, to a scalar by `agg` (policy_loss's
    docstring); the KL term goes through it too, as in verl, so both terms weigh tokens alike."""
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return losses.sum() / max(float(denom), 1.0)
    if agg == "seq-mean-token-mean":  # a row without loss tokens adds 0
        return (losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    norm = mask.shape[1] if num_tokens is None else num_tokens  # seq-mean-token-sum-norm
    return (losses.sum(dim=1) / norm).mean()


def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token KL(pi || ref) estimate from log-probs of sampled tokens, shape of logp.

    k1 ("kl"):          logp - ref_logp                      (unbiased, high variance)
    k2 ("mse"):         0.5 * (logp - ref_logp)^2
    k3 ("low_var_kl"):  exp(ref - logp) - (ref - logp) - 1, log-ratio clamped to +-20 and the
                        result to +-10 (verl); unbiased and >= 0, but its gradient is not KL's.
    Mask the result yourself (observation tokens must not enter the KL either).
    """
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-KL_LIMIT, KL_LIMIT)
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected k1/kl, k2/mse or k3/low_var_kl")


def choice_barrier(choice_logprobs, choice_mask, num_choices=None, weights=None):
    """Log-barrier that keeps every expert and skill choosable: sum over kinds of
    -mean over choice positions and candidates of log pi(candidate).

    choice_logprobs: {"expert": (K_e, C_e), "skill": (K_s, C_s)}: at each of K positions where the
    policy picked a name, the log-probs of its candidate tokens (maestro.choice_tokens); choice_mask,
    same shapes: 1 for a candidate, 0 for padding (a position with fewer). A kind with K = 0 adds 0.
    num_choices: optional {kind: count} of choice positions in the whole optimizer step (all
    micro-batches and ranks), so micro-batch barriers add up to the full-batch barrier; defaults
    to this batch's K. weights: optional {kind: (K,)} multipliers per choice position (train.py
    passes the failure rate of the rollout's group: explore where the policy fails).
    With one expert and one skill choice per rollout this is the term a text-only probe of the toy
    world measured (weight 0.01 prevents routing collapse, 0.003 is too weak, 0.05 too strong).
    Unlike an entropy bonus it hardly resists a peaked distribution; it only forbids 0.
    """
    total = 0.0
    for kind, lp in choice_logprobs.items():
        if lp.numel() == 0:
            continue
        count = lp.shape[0] if num_choices is None else num_choices[kind]
        mask = choice_mask[kind]
        per_position = (lp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        per_position = per_position if weights is None else per_position * weights[kind]
        total = total - per_position.sum() / max(float(count), 1.0)
    if isinstance(total, float):  # no choice anywhere: a zero on the log-probs' device
        return next(iter(choice_logprobs.values())).new_zeros(()) if choice_logprobs else torch.zeros(())
    return total


def grpo_loss(out, batch, advantages, norms, cfg, old_logp=None, ref_logp=None, barrier_weights=None):
    """The loss of one micro-batch: clipped policy gradient + optional KL to a reference + optional
    routing barrier, each normalized by the counts of the whole optimizer step (`norms`), so the
    micro-batch losses of all ranks add up to the full-batch loss.

    out: compute_logprobs' output ("logprobs" (B, L-1), and "choice_logprobs" when the barrier is on);
    batch: collate's dict, on the same device; advantages, barrier_weights: (B,) on that device
    (barrier_weights None: weight 1 everywhere); old_logp, ref_logp: (B, L-1) or None (on-policy:
    the ratio is exactly 1; no KL term). norms: {"tokens", "rows", "expert", "skill"}: loss tokens,
    rows and choice positions of the step on all ranks. cfg: an UpdateConfig.
    Returns (loss, stats: dict of 0-dim tensors summed over tokens: kl_ref; plus policy_loss's metrics).
    """
    logp = out["logprobs"].float()
    mask = batch["loss_mask"][:, 1:].bool()
    old_logp = logp.detach() if old_logp is None else old_logp
    if cfg.loss_agg == "token-mean":
        scale, norm = 1.0, norms["tokens"]
    else:  # per-sequence modes: each micro-batch's mean weighted by its share of the step's rows
        scale = advantages.shape[0] / max(norms["rows"], 1)
        norm = cfg.max_response_tokens if cfg.loss_agg == "seq-mean-token-sum-norm" else None
    pg, stats = policy_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high,
                            cfg.dual_clip or None, cfg.loss_agg, norm)
    loss = pg * scale
    if ref_logp is not None:
        kl = torch.where(mask, kl_penalty(logp, ref_logp, cfg.kl_kind), 0.0)
        loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.loss_agg, norm) * scale
        stats["kl_ref"] = kl.sum().detach()
    if cfg.barrier > 0 and "choice_logprobs" in out:
        weights = None
        if barrier_weights is not None:  # each choice position takes its row's weight
            weights = {kind: barrier_weights[where[:, 0]] for kind, where in batch["choice_index"].items()}
        loss = loss + cfg.barrier * choice_barrier(out["choice_logprobs"], batch["choice_mask"], norms, weights)
    return loss, stats


def demonstration_loss(logp, batch, num_tokens, skip_choices=False):
    """Mean NLL of a micro-batch of teacher-forced demonstrations over `num_tokens` (the loss-mask
    tokens of the whole step on all ranks, less the choices when they are skipped).

    logp: (B, L-1) log-probs (compute_logprobs); batch: collate's dict on logp's device.
    skip_choices leaves out the choice token of every expert and skill name (choice_index column c
    predicts the name token, i.e. logprobs column c): the routing choice that a GRPO anchor must
    leave to the reward."""
    mask = batch["loss_mask"][:, 1:].bool()
    if skip_choices:
        for where in batch["choice_index"].values():
            mask[where[:, 0], where[:, 1]] = False
    return -torch.where(mask, logp.float(), 0.0).sum() / max(num_tokens, 1.0)


@dataclass
class UpdateConfig:
    """What the update reads of train.py's config (the same keys and meanings; see DEFAULTS there)."""
    temperature: float = 1.0
    micro_batch_tokens: int = 16384
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    drop_zero_adv: bool = True
    loss_agg: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    max_response_tokens: int = 4096
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    barrier: float = 0.0
    anchor: float = 0.0
    share_prefix: bool = True          # each group's prompt once in the training forward (shared_prefix_logits);
                                       # off by itself under activation checkpointing (no KV cache there)

    @classmethod
    def of(cls, cfg: dict):
        """The update's part of a train.py config dict."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


@dataclass
class StepBatch:
    """What one GRPO step learns from on this rank."""
    trajectories: list                 # rollout.Trajectory, this rank's rows
    advantages: torch.Tensor           # (B,) one per trajectory
    barrier_weights: torch.Tensor | None = None  # (B,) multiplier of each row's barrier term; None: 1
    anchor_demos: list = ()            # teacher-forced demonstrations for the anchor NLL (cfg.anchor)


# ----------------------------------------------------------------------------------------------
# The update

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


def micro_batches(model, trajectories, rows, cfg, ranks, processor):
    """Collated micro-batches over `rows` (indexes into trajectories), on the model's device,
    padded with zero-weight repeats so every rank runs the same number of forward/backward passes,
    each through the vision tower (DDP and FSDP2 collectives must match). Yields (batch, row
    indexes, weight)."""
    lengths = [len(trajectories[i].prompt_ids) + len(trajectories[i].response_ids) for i in rows]
    plan = [[rows[j] for j in mb] for mb in plan_micro_batches(lengths, cfg.micro_batch_tokens)]
    count = int(ranks.max(len(plan)))
    weights = [1.0] * len(plan)
    filler = plan[-1] if plan else [0]  # a rank with nothing to learn still joins the collectives
    plan += [filler] * (count - len(plan))
    weights += [0.0] * (count - len(weights))
    # a wrapped model (torchrun, one process too) runs the vision tower in every micro-batch: DDP
    # raises at the next step when a parameter went unused, FSDP2's ranks must all-gather alike
    blank = torch.distributed.is_initialized()

    def share(rows):  # every rank the same forwards (FSDP2's collectives); alone, where rows share anything
        return cfg.share_prefix and not unwrap(model).is_activation_checkpointing and (ranks.size > 1 or len(rows) > 1)
    batches = [collate([trajectories[i] for i in mb], processor, ranks.device, blank, share(mb)) for mb in plan]
    if ranks.size > 1:  # FSDP2: the common start runs as its own forward only where every rank has one
        lacking = ranks.sum([float(not batch.get("common_len")) for batch in batches])
        for batch, lack in zip(batches, lacking):
            if lack and batch.get("common_len"):  # then the whole layout (holes masked) in one forward
                batch["forward_tokens"] += (batch["prefix_ids"].shape[0] - 1) * batch["common_len"]
                batch["forward_padded"] += (batch["prefix_ids"].shape[0] - 1) * batch["common_len"]
                batch["common_len"] = 0
    return list(zip(batches, plan, weights))


def rows_to_train(advantages, barrier_weights, trajectories, cfg, with_kl):
    """Row indexes the update must run. A row with advantage 0 has exactly zero policy-gradient
    loss, so drop_zero_adv skips it, unless it still carries a KL term or a routing-barrier term
    (a group where every rollout failed has advantage 0 and barrier weight 1). Skipping changes
    nothing but the cost: every normalizer counts all rows."""
    def contributes(i):
        if advantages[i] != 0 or with_kl:
            return True
        barrier = cfg.barrier > 0 and bool(trajectories[i].choice_positions)
        return barrier and (barrier_weights is None or float(barrier_weights[i]) > 0)
    return [i for i in range(len(trajectories)) if not cfg.drop_zero_adv or contributes(i)]


def update_policy(model, optimizer, step, cfg, ranks, processor, ref_model=None):
    """cfg.ppo_epochs optimizer steps of the clipped GRPO loss on this rank's StepBatch `step`.

    The loss of every micro-batch is normalized by the token (and choice) counts of the whole step
    on all ranks and multiplied by the world size (DDP and FSDP average gradients), so the summed
    gradient equals that of one process on the global batch. The anchor demonstrations' NLL,
    routing choices left out, is added with weight cfg.anchor (demonstration_nll). Gradients are
    reduced over ranks once per optimizer step. ref_model: the frozen reference of the KL term
    (cfg.kl_coef > 0).
    Returns metrics averaged over the step's tokens on all ranks.
    """
    trajectories, advantages, barrier_weights = step.trajectories, step.advantages, step.barrier_weights
    anchor_demos = step.anchor_demos
    kinds = ("expert", "skill")
    local = [sum(sum(t.loss_mask) for t in trajectories), len(trajectories)]
    local += [sum(kind == k for t in trajectories for _, kind, _ in t.choice_positions) for k in kinds]
    num_tokens, num_rows, *num_choices = ranks.sum(local)
    norms = {"tokens": num_tokens, "rows": num_rows, **dict(zip(kinds, num_choices))}
    use_barrier = cfg.barrier > 0
    rows = rows_to_train(advantages, barrier_weights, trajectories, cfg, ref_model is not None)
    batches = micro_batches(model, trajectories, rows, cfg, ranks, processor)

    def forward(net, batch, with_choices=False):
        with autocast(ranks):
            return compute_logprobs(net, batch, cfg.temperature, with_choices)

    old, ref = [], []
    if cfg.ppo_epochs > 1 or ref_model is not None:
        with torch.no_grad():
            for batch, _, _ in batches:
                if cfg.ppo_epochs > 1:
                    old.append(forward(model, batch)["logprobs"].float())
                if ref_model is not None:
                    ref.append(forward(ref_model, batch)["logprobs"].float())

    sums = Counter()
    grad_norms, anchor_nll = [], 0.0
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for j, (batch, mb, weight) in enumerate(batches):
            rows_of = lambda values: torch.tensor([float(values[i]) for i in mb], device=ranks.device)  # noqa: E731
            with gradient_sync(model, j == len(batches) - 1 and not anchor_demos):  # DDP decides at forward time
                out = forward(model, batch, use_barrier)
                loss, stats = grpo_loss(out, batch, rows_of(advantages), norms, cfg, old[j] if old else None, ref[j]
                                        if ref else None, None if barrier_weights is None else rows_of(barrier_weights))
                (loss * weight * ranks.size).backward()
            n = batch["num_tokens"] * weight
            sums["tokens"] += n
            sums["loss"] += loss.item() * weight
            sums["kl_ref"] += float(stats.pop("kl_ref", 0.0)) * weight
            for key in ("clipfrac_high", "clipfrac_low", "clipfrac_dual", "approx_kl"):
                sums[key] += float(stats[key]) * n
            if epoch == 0:  # training vs sampling log-probs: large gaps mean a rollout/training mismatch
                sampled = batch["loss_mask"][:, 1:].bool() & ~batch["old_logprobs"][:, 1:].isnan()
                gap = torch.where(sampled, (out["logprobs"].detach().float() - batch["old_logprobs"][:, 1:]).abs(), 0.0)
                sums["logprob_gap"] += float(gap.sum()) * weight
                sums["gap_tokens"] += float(sampled.sum()) * weight
        if anchor_demos:
            anchor_nll += demonstration_nll(model, anchor_demos, processor, cfg, ranks,
                                            cfg.anchor, skip_choices=True)[0] / cfg.ppo_epochs
        grad_norms.append(clip_gradients(model, cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)
    totals = dict(zip(keys, ranks.sum([sums[k] for k in keys])))
    tokens = max(totals.get("tokens", 0.0), 1.0)
    metrics = {k: totals[k] / tokens for k in ("clipfrac_high", "clipfrac_low", "clipfrac_dual", "approx_kl")
               if k in totals}
    metrics["logprob_gap"] = totals.get("logprob_gap", 0.0) / max(totals.get("gap_tokens", 0.0), 1.0)
    metrics["loss"] = totals.get("loss", 0.0) / cfg.ppo_epochs
    if ref_model is not None:
        metrics["kl_ref"] = totals.get("kl_ref", 0.0) / tokens
    if anchor_demos:
        metrics["anchor_nll"] = anchor_nll  # averaged over all ranks' tokens already
    metrics["grad_norm"], metrics["grad_norm_max"] = grad_norms[0], max(grad_norms)  # on-policy epoch; any epoch
    metrics["train_tokens"] = num_tokens
    metrics["train_rows"] = num_rows
    metrics["micro_batches"] = len(batches)
    real, padded = ranks.sum([sum(b["forward_tokens"] for b, _, w in batches if w),
                              sum(b["forward_padded"] for b, _, w in batches if w)])
    metrics["padding_fraction"] = 1.0 - real / padded if padded else 0.0
    metrics["seq_tokens"] = real  # non-pad tokens through the training forward, all ranks
    return metrics


def demonstration_nll(model, trajectories, processor, cfg, ranks, scale=1.0, skip_choices=False):
    """Backpropagate scale x the NLL of the loss_mask tokens of teacher-forced demonstrations,
    averaged over the tokens of all ranks (same normalization and masking as the GRPO loss), and
    return that NLL. skip_choices leaves out the choice token of every expert and skill name: the
    routing choice, which the GRPO anchor must leave to the reward. Its last backward reduces the
    gradients over ranks (it is always the last of an optimizer step). Returns (NLL, tokens counted)."""
    rows = list(range(len(trajectories)))
    num_tokens = ranks.sum([sum(sum(t.loss_mask) - skip_choices * len(t.choice_positions)
                                for t in trajectories)])[0]
    model.train()
    total = 0.0
    batches = micro_batches(model, trajectories, rows, cfg, ranks, processor)
    for j, (batch, _, weight) in enumerate(batches):
        with gradient_sync(model, j == len(batches) - 1), autocast(ranks):  # DDP decides at forward time
            logp = compute_logprobs(model, batch, 1.0)["logprobs"]
            loss = demonstration_loss(logp, batch, num_tokens, skip_choices)
            (loss * scale * weight * ranks.size).backward()
        total += loss.item() * weight
    return ranks.sum([total])[0], num_tokens


def sft_step(model, optimizer, trajectories, processor, cfg, ranks):
    """One supervised step on teacher-forced demonstrations (demonstration_nll, then the optimizer)."""
    nll, num_tokens = demonstration_nll(model, trajectories, processor, cfg, ranks)
    grad_norm = clip_gradients(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"nll": nll, "grad_norm": grad_norm, "tokens": num_tokens}
