"""GRPO pieces: group advantages, the clipped policy loss, KL estimators, the routing log-barrier.

Everything here is a pure function of tensors, small enough to check by hand (tests/test_grpo.py
does, against closed forms). Semantics follow verl's core_algos (vanilla PPO loss with dual clip,
token-mean aggregation, k1/k2/k3 KL), with two additions the trainer needs:
  * `num_tokens` / `num_choices`: normalizers for the whole optimizer step, so that summing the
    losses of micro-batches (and of ranks) gives exactly the full-batch loss;
  * `choice_barrier`: a log-barrier on the expert/skill choice distributions, the measured fix
    for routing collapse (README, "The toy world").

Masked positions are removed with torch.where *before* any arithmetic, so an inf or NaN sitting
at a masked position (padding, observation tokens) can reach neither the loss nor the gradient.
"""
import torch

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
    losses = torch.where(mask, losses, zero)

    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        loss = losses.sum() / max(float(denom), 1.0)
    elif agg == "seq-mean-token-mean":
        seq_loss = losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # a row without loss tokens adds 0
        loss = seq_loss.mean()
    else:  # seq-mean-token-sum-norm
        norm = mask.shape[1] if num_tokens is None else num_tokens
        loss = (losses.sum(dim=1) / norm).mean()

    with torch.no_grad():  # 0-dim tensors: reading them is the caller's choice (no host sync here)
        n = mask.sum().clamp(min=1)
        metrics = {
            "clipfrac_high": ((ratio > 1.0 + clip_high) & (advantages > 0) & mask).sum() / n,
            "clipfrac_low": ((ratio < 1.0 - clip_low) & (advantages < 0) & mask).sum() / n,
            "clipfrac_dual": (dual_active & mask).sum() / n,
            "approx_kl": torch.where(mask, -log_ratio, zero).sum() / n,
        }
    return loss, metrics


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


def choice_barrier(choice_logprobs, num_choices=None, weights=None):
    """Log-barrier that keeps every expert and skill choosable: sum over kinds of
    -mean over choice positions and candidates of log pi(candidate).

    choice_logprobs: {"expert": (K_e, C_e), "skill": (K_s, C_s)}: at each of K positions where the
    policy picked a name, the log-probs of all C advertised candidates. A kind with K = 0 adds 0.
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
        per_position = lp.mean(dim=1) if weights is None else lp.mean(dim=1) * weights[kind]
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
    rows and choice positions of the step on all ranks. cfg: train.py's config keys clip_low,
    clip_high, dual_clip, loss_agg, max_response_tokens, kl_coef, kl_kind, barrier.
    Returns (loss, stats: dict of 0-dim tensors summed over tokens: kl_ref; plus policy_loss's metrics).
    """
    logp = out["logprobs"].float()
    mask = batch["loss_mask"][:, 1:].bool()
    old_logp = logp.detach() if old_logp is None else old_logp
    if cfg["loss_agg"] == "token-mean":
        scale, norm = 1.0, norms["tokens"]
    else:  # per-sequence modes: each micro-batch's mean weighted by its share of the step's rows
        scale = advantages.shape[0] / max(norms["rows"], 1)
        norm = cfg["max_response_tokens"] if cfg["loss_agg"] == "seq-mean-token-sum-norm" else None
    pg, stats = policy_loss(logp, old_logp, advantages, mask, cfg["clip_low"], cfg["clip_high"],
                            cfg["dual_clip"] or None, cfg["loss_agg"], norm)
    loss = pg * scale
    if ref_logp is not None:
        kl = torch.where(mask, kl_penalty(logp, ref_logp, cfg["kl_kind"]), 0.0).sum()
        loss = loss + cfg["kl_coef"] * kl / max(norms["tokens"], 1.0)
        stats["kl_ref"] = kl.detach()
    if cfg["barrier"] > 0 and "choice_logprobs" in out:
        weights = None
        if barrier_weights is not None:  # each choice position takes its row's weight
            weights = {kind: barrier_weights[where[:, 0]] for kind, where in batch["choice_index"].items()}
        loss = loss + cfg["barrier"] * choice_barrier(out["choice_logprobs"], norms, weights)
    return loss, stats


def demonstration_loss(logp, batch, num_tokens, skip_choices=False):
    """Mean NLL of a micro-batch of teacher-forced demonstrations over `num_tokens` (the loss-mask
    tokens of the whole step on all ranks, less the choices when they are skipped).

    logp: (B, L-1) log-probs (compute_logprobs); batch: collate's dict on logp's device.
    skip_choices leaves out the first token of every expert and skill name (choice_index column c
    predicts the name token, i.e. logprobs column c): the routing choice that a GRPO anchor must
    leave to the reward."""
    mask = batch["loss_mask"][:, 1:].bool()
    if skip_choices:
        for where in batch["choice_index"].values():
            mask[where[:, 0], where[:, 1]] = False
    return -torch.where(mask, logp.float(), 0.0).sum() / max(num_tokens, 1.0)
