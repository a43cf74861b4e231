"""grpo.py against closed forms worked out by hand in the comments."""
import math

import pytest
import torch

from grpo import UpdateConfig, choice_barrier, group_advantages, grpo_loss, kl_penalty, policy_loss


# ---------------------------------------------------------------- group_advantages

def test_advantages_hand_computed_unbiased_std():
    # group [1,0,0,1]: mean .5, unbiased std sqrt(4*.25/3) = 0.57735 -> +-0.866025
    # group [0,1,2]-style check in the next test; group [1,1,1,1] has zero variance
    adv, zero = group_advantages(torch.tensor([1., 0., 0., 1., 1., 1., 1., 1.]), 4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-6)
    assert zero == 1


def test_advantages_three_values_and_population_difference():
    # [0,1,2]: mean 1, unbiased std 1 -> [-1,0,1]/(1+eps)
    adv, zero = group_advantages([0., 1., 2.], 3, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1., 0., 1.]))
    assert zero == 0
    # population std would be sqrt(2/3): the unbiased std is larger by sqrt(G/(G-1)) = sqrt(3/2)
    population = (torch.tensor([0., 1., 2.]) - 1.0) / math.sqrt(2 / 3)
    assert torch.allclose(adv * math.sqrt(3 / 2), population, atol=1e-6)


def test_advantages_singleton_groups_are_zero():
    adv, zero = group_advantages([0.3, -1.0, 7.0], 1)
    assert torch.equal(adv, torch.zeros(3))
    assert zero == 3


def test_advantages_near_constant_group_uses_tolerance():
    # 0.1 + 1e-9 noise: std ~ 5e-10 < tol -> exactly zero, not an amplified +-0.7
    adv, zero = group_advantages(torch.tensor([0.1, 0.1 + 1e-9, 0.1, 0.1], dtype=torch.float64), 4)
    assert torch.equal(adv, torch.zeros(4)) and zero == 1


def test_advantages_without_std_scaling_only_centre():
    adv, zero = group_advantages([1., 0., 0., 0., 2., 4.], 3, scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2., 0., 2.]))
    assert zero == 0


def test_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1., 2., 3.], 4)


# ---------------------------------------------------------------- policy_loss

def _two_by_three():
    """Row 0: A=+1, ratios 1, 1.5, 0.5. Row 1: A=-2, ratios 1.1, 0.7, (5, masked)."""
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 5.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
    logp = old + ratios.log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old, adv, mask


def test_policy_loss_by_hand():
    # token losses, clip 0.2/0.2:
    #   A=+1: -min(r, clip(r)) -> -1, -1.2 (clipped high), -0.5
    #   A=-2:  2*max(r, clip(r)) -> 2.2, 1.6 (clipped low); dual cap 6 not reached
    # token-mean: (-1 - 1.2 - 0.5 + 2.2 + 1.6) / 5 = 0.22
    logp, old, adv, mask = _two_by_three()
    loss, m = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(0.22, abs=1e-6)
    assert float(m["clipfrac_high"]) == pytest.approx(0.2)
    assert float(m["clipfrac_low"]) == pytest.approx(0.2)
    assert float(m["clipfrac_dual"]) == 0.0
    kl = -(math.log(1.5) + math.log(0.5) + math.log(1.1) + math.log(0.7)) / 5
    assert float(m["approx_kl"]) == pytest.approx(kl, abs=1e-6)


def test_policy_loss_sequence_aggregations():
    logp, old, adv, mask = _two_by_three()
    # per-sequence: row0 sum -2.7 over 3 tokens, row1 sum 3.8 over 2 tokens
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-0.9 + 1.9) / 2, abs=1e-6)
    # Dr. GRPO: each sum divided by T=3, then the mean over sequences
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm")
    assert loss.item() == pytest.approx((-2.7 / 3 + 3.8 / 3) / 2, abs=1e-6)
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", num_tokens=10)
    assert loss.item() == pytest.approx((-2.7 / 10 + 3.8 / 10) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(logp, old, adv, mask, agg="sum")


def test_dual_clip_caps_negative_advantage_and_kills_its_gradient():
    # A=-1, r=5: clipped surrogate max(5, 1.2) = 5; dual clip caps at 3
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(5.0)]], requires_grad=True)
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 1)
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert float(m["clipfrac_dual"]) == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=None)
    assert loss.item() == pytest.approx(5.0, rel=1e-6)
    assert float(m["clipfrac_dual"]) == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0)


def test_asymmetric_clip_higher():
    # A=+1, r=1.5: clip-high 0.28 -> -1.28; r=0.5 with A=-1, clip-low 0.2 -> max(.5,.8) = .8
    old = torch.zeros(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1),
                          clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2, abs=1e-6)
    assert float(m["clipfrac_high"]) == 0.5 and float(m["clipfrac_low"]) == 0.5


def test_on_policy_gradient_is_vanilla_policy_gradient():
    # ratio 1 everywhere: d loss / d logp = -A / num_tokens at every unmasked token
    logp = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.5, -1.5])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    expected = -adv[:, None].expand(2, 4) / 6 * mask
    assert torch.allclose(logp.grad, expected)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1e30])
def test_masked_token_contributes_exactly_zero(bad):
    logp, old, adv, mask = _two_by_three()
    ref_loss, _ = policy_loss(logp, old, adv, mask)
    logp = logp.clone()
    logp[1, 2] = bad
    old = old.clone()
    old[1, 2] = bad if bad != 1e30 else -1e30
    logp.requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask)
    assert loss.item() == ref_loss.item()
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 2].item() == 0.0
    assert math.isfinite(float(m["approx_kl"]))
    # (B,T) advantages with garbage at the masked position too
    adv_bt = adv[:, None].expand(2, 3).clone()
    adv_bt[1, 2] = float("nan")
    logp.grad = None
    loss, _ = policy_loss(logp, old, adv_bt, mask)
    loss.backward()
    assert loss.item() == ref_loss.item() and logp.grad[1, 2].item() == 0.0


def test_token_mean_with_global_count_is_split_invariant():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    old = -torch.rand(B, T, generator=g) * 3
    logp0 = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    logp = logp0.clone().requires_grad_(True)
    full, _ = policy_loss(logp, old, adv, mask)
    full.backward()
    full_grad = logp.grad.clone()

    logp = logp0.clone().requires_grad_(True)
    total = 0.0
    num_tokens = int(mask.sum())
    for lo, hi in [(0, 2), (2, 5), (5, 6)]:  # uneven micro-batches, as after length sorting
        part, _ = policy_loss(logp[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], num_tokens=num_tokens)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(logp.grad, full_grad, atol=1e-7)


def test_the_kl_term_is_aggregated_like_the_policy_term():
    """Rows of 1 and 3 loss tokens, k1 = 1 on row 0's token and 0 elsewhere, zero advantages: the
    loss is the KL alone, (1/1 + 0/3) / 2 = 0.5 per sequence, 1/4 per token, (1/T) / 2 sum-normed."""
    logp = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])  # collate's layout: column t + 1 is token t's mask
    batch, out = {"loss_mask": mask}, {"logprobs": logp}
    norms = {"tokens": 4, "rows": 2, "expert": 0, "skill": 0}
    expected = {"token-mean": 0.25, "seq-mean-token-mean": 0.5, "seq-mean-token-sum-norm": 0.5 / 8}
    for agg, value in expected.items():
        cfg = UpdateConfig(loss_agg=agg, kl_coef=1.0, kl_kind="k1", max_response_tokens=8)
        loss, stats = grpo_loss(out, batch, torch.zeros(2), norms, cfg, ref_logp=torch.zeros_like(logp))
        assert float(loss) == pytest.approx(value) and float(stats["kl_ref"]) == pytest.approx(1.0), agg


# ---------------------------------------------------------------- kl_penalty

def test_kl_estimators_closed_form():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "kl").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "mse").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    # k3: r = ref/p = 0.5 -> 0.5 - ln 0.5 - 1 = ln 2 - 0.5
    assert kl_penalty(logp, ref, "low_var_kl").item() == pytest.approx(math.log(2) - 0.5)
    assert kl_penalty(logp, logp, "k3").item() == 0.0
    # clamped: ref - logp = 30 -> 20 -> exp(20) - 21 -> 10
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([30.0]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- choice_barrier

def ones(choice_logprobs):
    """Every candidate real: positions that all have the same number of candidates."""
    return {kind: torch.ones_like(lp) for kind, lp in choice_logprobs.items()}


def test_barrier_value_and_gradient_pushes_dominant_choice_down():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    skill_logits = torch.tensor([[0.0, 3.0]], requires_grad=True)
    lp = {"expert": torch.log_softmax(logits, -1), "skill": torch.log_softmax(skill_logits, -1)}
    b = choice_barrier(lp, ones(lp))
    # per position: -mean_c log p_c = logsumexp(z) - mean(z)
    expected = sum((torch.logsumexp(z, -1) - z.mean(-1)).mean() for z in (logits, skill_logits))
    assert b.item() == pytest.approx(expected.item(), abs=1e-6)
    b.backward()
    # d/dz_k = (p_k - 1/C) / K: positive for the over-used candidate, so descent lowers it
    p = torch.softmax(logits, -1)
    assert torch.allclose(logits.grad, (p - 1 / 3) / 2, atol=1e-6)
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0
    assert skill_logits.grad[0, 1] > 0


def test_barrier_empty_and_global_count():
    empty = {"expert": torch.zeros(0, 4), "skill": torch.zeros(0, 3)}
    assert choice_barrier(empty, ones(empty)).item() == 0.0
    assert choice_barrier({}, {}).item() == 0.0
    lp = torch.log_softmax(torch.randn(5, 4), -1)
    whole = choice_barrier({"expert": lp}, {"expert": torch.ones(5, 4)})
    parts = sum(choice_barrier({"expert": lp[a:b]}, {"expert": torch.ones(b - a, 4)}, num_choices={"expert": 5})
                for a, b in [(0, 2), (2, 5)])
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_barrier_means_over_each_positions_own_candidates():
    """Positions with different numbers of candidates (names that share tokens before the choice,
    views of different sizes): the second position has two, its third column is padding
    (a real token's log-prob, masked out) and stays out of its mean."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 3.0]], requires_grad=True)
    lp = {"expert": torch.log_softmax(logits, -1)}
    b = choice_barrier(lp, {"expert": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])})
    first = -torch.log_softmax(logits[0], -1).mean()
    second = -torch.log_softmax(logits[1], -1)[:2].mean()
    assert b.item() == pytest.approx(((first + second) / 2).item(), abs=1e-6)
    b.backward()
    # d/dz_k of -(log p_0 + log p_1)/2 over K = 2 positions: (p_k - [k < 2] / 2) / 2
    p = torch.softmax(logits[1], -1).detach()
    assert torch.allclose(logits.grad[1], (p - torch.tensor([0.5, 0.5, 0.0])) / 2, atol=1e-6)


def test_barrier_weights_scale_each_position():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    lp = {"expert": torch.log_softmax(logits, -1)}
    weights = {"expert": torch.tensor([0.0, 0.5, 1.0])}
    b = choice_barrier(lp, ones(lp), weights=weights)
    per_position = torch.logsumexp(logits, -1) - logits.mean(-1)
    assert b.item() == pytest.approx(((per_position * weights["expert"]).sum() / 3).item(), abs=1e-6)
    b.backward()
    assert torch.all(logits.grad[0] == 0)  # a solved group (weight 0) is left to sharpen
    p = torch.softmax(logits, -1)
    assert torch.allclose(logits.grad[1], 0.5 * (p[1] - 1 / 3) / 3, atol=1e-6)
