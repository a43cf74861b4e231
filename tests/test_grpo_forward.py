"""The shared-prefix training forward (logprobs.shared_prefix_logits) against the full forward: each
group's prompt computed once and its rows continued from its K/V must give the same log-probs,
loss and gradient of every parameter, for sampled groups with ragged rows and images, for
micro-batches that split a group, and for text-only rows that need the blank image."""
import random
from dataclasses import replace

import pytest
import torch

import toyworld
from environment import demonstration_turns
from grpo import UpdateConfig, grpo_loss
from logprobs import collate, compute_logprobs
from maestro import format_answer
from policy import load_policy
from rollout import trajectory_from_texts

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def groups(demos):
    """3 prompts x 4 rows: each row a different random pair, one or two calls (ragged rows)."""
    processor, _, env, _ = demos
    rng, trajectories = random.Random(1), []
    for sample in toyworld.make_samples("test", 3, seed=1):
        for row in range(4):
            calls = [demonstration_turns(sample, env, rng, toyworld.request_of)[0][0] for _ in range(1 + row % 2)]
            trajectories.append(trajectory_from_texts(processor, sample, env, calls + [format_answer("7")]))
    assert len({len(t.response_ids) for t in trajectories}) >= 4  # ragged rows
    return processor, trajectories


def loss_and_grads(model, processor, trajectories, share, norms, blank=False):
    """Sum over micro-batches (lists of row indexes) of the GRPO loss with the barrier, and the
    resulting gradient of every parameter."""
    model.zero_grad()
    cfg = UpdateConfig(barrier=0.05, kl_coef=0.0)
    total, logps = 0.0, []
    for rows in norms["micro_batches"]:
        batch = collate([trajectories[i] for i in rows], processor, blank_image=blank, share_prefix=share)
        out = compute_logprobs(model, batch, 1.0, with_choices=True)
        advantages = torch.linspace(-1.0, 1.0, len(trajectories))[rows]
        loss, _ = grpo_loss(out, batch, advantages, norms, cfg)
        loss.backward()
        total += loss.item()
        logps.append(out["logprobs"][batch["loss_mask"][:, 1:].bool()].detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, torch.cat(logps), grads


def step_norms(trajectories, micro_batches):
    return {"tokens": float(sum(sum(t.loss_mask) for t in trajectories)), "rows": float(len(trajectories)),
            "expert": float(sum(k == "expert" for t in trajectories for _, k, _ in t.choice_positions)),
            "skill": float(sum(k == "skill" for t in trajectories for _, k, _ in t.choice_positions)),
            "micro_batches": micro_batches}


@pytest.mark.parametrize("micro_batches", [
    [list(range(12))],                                   # whole groups in one micro-batch
    [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]],          # the second group split over two micro-batches
    [[11, 0, 5], [3, 8, 1, 10], [2, 4, 6, 7, 9]],        # rows of every group scattered
])
def test_shared_prefix_forward_equals_the_full_forward(tiny_dir, groups, micro_batches):
    processor, trajectories = groups
    model, _ = load_policy(tiny_dir)
    norms = step_norms(trajectories, micro_batches)
    full_loss, full_logp, full_grads = loss_and_grads(model, processor, trajectories, False, norms)
    shared_loss, shared_logp, shared_grads = loss_and_grads(model, processor, trajectories, True, norms)
    assert full_logp.numel() == sum(sum(t.loss_mask) for t in trajectories)
    torch.testing.assert_close(shared_logp, full_logp, atol=TOLERANCE, rtol=0)
    assert shared_loss == pytest.approx(full_loss, abs=TOLERANCE)
    assert shared_grads.keys() == full_grads.keys() and any("visual" in k for k in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=TOLERANCE, rtol=1e-4, msg=name)
    assert max(g.abs().max() for g in full_grads.values()) > 1e-3  # something flows


def test_rows_without_a_response_share_the_prefix_too(tiny_dir, groups):
    """Upstream's loop can drop every turn of a row (an empty response, nothing to train): a
    micro-batch of such rows still runs both forwards of the shared-prefix path, as the full one does."""
    processor, trajectories = groups
    model, _ = load_policy(tiny_dir)
    empty = [replace(t, response_ids=[], loss_mask=[], sample_logprobs=[], choice_positions=[]) for t in trajectories[:2]]
    full, shared = (compute_logprobs(model, collate(empty, processor, share_prefix=share)) for share in (False, True))
    torch.testing.assert_close(shared["logprobs"], full["logprobs"], atol=TOLERANCE, rtol=0)
    shared["logprobs"].sum().backward()  # the update's backward runs through both forwards


def test_shared_prefix_computes_each_prompt_once(groups):
    processor, trajectories = groups
    full, shared = collate(trajectories, processor), collate(trajectories, processor, share_prefix=True)
    assert shared["prefix_ids"].shape[0] == 3 and shared["row_prefix"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert shared["prefix_pixel_values"].shape[0] * 4 == full["pixel_values"].shape[0]  # images once per prompt
    # the system prompt, which all three prompts start with, once: up to the image
    prompt = trajectories[0].prompt_ids
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert shared["common_len"] == prompt.index(vision_start) > 0
    assert shared["forward_tokens"] == (shared["common_len"] + sum(len(t.prompt_ids) - shared["common_len"]
                                                                   for t in trajectories[::4])
                                        + sum(len(t.response_ids) for t in trajectories))
    assert shared["forward_tokens"] < 0.5 * full["forward_tokens"]


def test_text_only_rows_share_the_prefix_beside_the_blank_image(tiny_dir, groups):
    processor, trajectories = groups
    text_only = [replace(t, pixel_values=None, image_grid_thw=None) for t in trajectories[:8]]
    # the prompts keep their image tokens but lose their pixels: build honest text-only rows instead
    vision_ids = {int(i) for i in collate(trajectories[:1], processor)["suppressed_ids"]}
    text_only = [replace(t, prompt_ids=[i for i in t.prompt_ids if i not in vision_ids]) for t in text_only]
    model, _ = load_policy(tiny_dir)
    norms = step_norms(text_only, [[0, 1, 2, 3, 4], [5, 6, 7]])
    full = loss_and_grads(model, processor, text_only, False, norms, blank=True)
    shared = loss_and_grads(model, processor, text_only, True, norms, blank=True)
    torch.testing.assert_close(shared[1], full[1], atol=TOLERANCE, rtol=0)
    assert any("visual" in k for k in shared[2])  # the blank image keeps the vision tower in the graph
    for name, grad in full[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=TOLERANCE, rtol=1e-4, msg=name)
