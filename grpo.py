"""GRPO pieces: group advantages, the clipped policy loss, KL estimators, the routing log-barrier.

Everything here is a pure function of tensors, small enough to check by hand (tests/test_grpo.py
does, against closed forms). Semantics follow verl's core_algos (vanilla PPO loss with dual clip,
token-mean aggregation, k1/k2/k3 KL), with two additions the trainer needs:
  * `num_tokens` / `num_choices`: normalizers for the whole optimizer step, so that summing the
    losses of micro-batches (and of ranks) gives exactly the full-batch loss;
  * `choice_barrier`: a log-barrier on the expert/skill choice distributions, the measured fix
    for routing collapse (docs: toy-learning-facts.md).

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
      "seq-mean-token-mean"     mean over sequences of each sequence's token mean
      "seq-mean-token-sum-norm" mean over sequences of (sequence token sum / num_tokens), where the
                                constant defaults to T = mask.shape[1] (Dr. GRPO)
    num_tokens: pass the token count of the whole optimizer step (all micro-batches, all ranks) so
    that micro-batch losses add up to the full-batch loss. Only token-mean and the sum-norm
    constant use it.
    Returns (loss scalar, metrics dict of floats: clipfrac_high, clipfrac_low, clipfrac_dual,
    approx_kl = mean(old_logp - logp), ratio_max) — metrics are over this batch's masked tokens.
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
        seq_tokens = mask.sum(dim=1)
        has_tokens = seq_tokens > 0
        seq_loss = losses.sum(dim=1) / seq_tokens.clamp(min=1)
        loss = seq_loss[has_tokens].sum() / max(int(has_tokens.sum()), 1)
    else:  # seq-mean-token-sum-norm
        norm = mask.shape[1] if num_tokens is None else num_tokens
        loss = (losses.sum(dim=1) / norm).mean()

    with torch.no_grad():
        n = max(int(mask.sum()), 1)
        metrics = {
            "clipfrac_high": float(((ratio > 1.0 + clip_high) & (advantages > 0) & mask).sum()) / n,
            "clipfrac_low": float(((ratio < 1.0 - clip_low) & (advantages < 0) & mask).sum()) / n,
            "clipfrac_dual": float((dual_active & mask).sum()) / n,
            "approx_kl": float(torch.where(mask, -log_ratio, zero).sum()) / n,
            "ratio_max": float(torch.where(mask, ratio, zero).max()) if mask.any() else 1.0,
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
    With one expert and one skill choice per rollout this is exactly the probe's term
    (toy-learning-facts.md: weight 0.01 prevents routing collapse, 0.003 is too weak, 0.05 too
    strong). Unlike an entropy bonus it hardly resists a peaked distribution; it only forbids 0.
    """
    total = torch.zeros(())
    for kind, lp in choice_logprobs.items():
        if lp.numel() == 0:
            continue
        count = lp.shape[0] if num_choices is None else num_choices[kind]
        per_position = lp.mean(dim=1) if weights is None else lp.mean(dim=1) * weights[kind].to(lp.device)
        total = total.to(lp.device) - per_position.sum() / max(float(count), 1.0)
    return total
