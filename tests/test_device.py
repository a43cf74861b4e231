"""The GPU path proven on this CPU: every tensor a train step, an SFT step, a rollout's sampling
step and an evaluation's loss path touch lives on the model's device.

The stand-in for a GPU is torch's `meta` device: tensors with shapes and no data, and the same
device rules as CUDA -- torch.where(cpu_mask, meta_logp, 0) raises "Tensor on device meta is not on
the expected device cpu!" exactly where a GPU run raised at its first GRPO step, while what CUDA
allows (a CPU index or a 0-dim CPU scalar) is allowed too. (torch's FakeTensorMode also makes fake
`cuda` tensors here, but on this CPU-only build it fails on plain slicing and indexing, x[:, 1:],
so it cannot carry this code.) A whole model forward does not run on meta (the model calls
.item()), so the model's output is a meta tensor of the right shape and the tests cover everything
from the model's output on: collate (images too), log-prob gathering, every loss term, the
demonstration NLL and the rollout's sampling step.
What they do not cover (only a real GPU does; `python bench.py --gpu`): the model forward itself,
the KV-cache decode loop (its tensors are made with the model's device, read in rollout.prefill /
feed / generate_turn) and NCCL.
"""
from dataclasses import replace

import pytest
import torch


from grpo import UpdateConfig, demonstration_loss, grpo_loss
from logprobs import collate, logprobs_from_logits
from rollout import RolloutConfig, _chat_tokens as _vocab, sample_tokens


def tensors_of(batch):
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from value.values()


def step_loss(batch, vocab_size, device):
    """The whole loss of one micro-batch from a stand-in model output on `device`: the clipped
    policy gradient with a PPO ratio, the KL term, the failure-weighted barrier and the anchor NLL."""
    rows = batch["loss_mask"].shape[0]
    logits = torch.randn(batch["num_tokens"], vocab_size, device=device)
    out = logprobs_from_logits(logits, batch, 1.0, with_choices=True)
    old = out["logprobs"] - 0.1
    ref = out["logprobs"] + 0.2
    cfg = UpdateConfig(kl_coef=0.1, barrier=0.01, ppo_epochs=2)
    norms = {"tokens": float(batch["num_tokens"]), "rows": float(rows), "expert": 8.0, "skill": 8.0}
    advantages = torch.linspace(-1.0, 1.0, rows, device=device)
    weights = torch.full((rows,), 0.5, device=device)
    loss, stats = grpo_loss(out, batch, advantages, norms, cfg, old, ref, weights)
    anchor = demonstration_loss(out["logprobs"], batch, float(batch["num_tokens"]), skip_choices=True)
    return loss + anchor, stats


def test_device_every_loss_term_stays_on_the_model_device(demos):
    processor, _, _, trajectories = demos
    vocab_size = len(processor.tokenizer)
    batch = collate(trajectories, processor, device="meta")
    assert {t.device.type for t in tensors_of(batch)} == {"meta"}
    loss, stats = step_loss(batch, vocab_size, "meta")
    assert loss.device.type == "meta" and loss.shape == ()
    assert all(v.device.type == "meta" for v in stats.values())
    # the defect this guards against: a batch left on the CPU meets the model's output
    with pytest.raises(RuntimeError, match="device"):
        step_loss(collate(trajectories, processor), vocab_size, "meta")


def test_device_sampling_step_stays_on_the_model_device(demos):
    processor = demos[0]
    vocab_size = len(processor.tokenizer)
    try:
        vocab = _vocab(processor, vocab_size, "meta")
        assert vocab.suppressed.device.type == vocab.may_close.device.type == "meta"
        logits = torch.randn(4, vocab_size, device="meta")
        for greedy in (False, True):
            tokens, logprobs = sample_tokens(logits, vocab.suppressed, RolloutConfig(greedy=greedy, top_p=0.9))
            assert tokens.device.type == logprobs.device.type == "meta"
            assert vocab.may_close[tokens].device.type == "meta"
        with pytest.raises(RuntimeError, match="same device"):  # suppressed ids left on the CPU
            sample_tokens(logits, _vocab(processor, vocab_size, "cpu").suppressed, RolloutConfig())
    finally:
        _vocab.cache_clear()


def test_device_collate_moves_images_and_the_blank_image_row(demos):
    processor, _, _, trajectories = demos
    with_images = collate(trajectories[:3], processor, device="meta")
    assert {t.device.type for t in tensors_of(with_images)} == {"meta"}
    assert with_images["pixel_values"].shape[0] > 0
    shared = collate(trajectories[:3] * 2, processor, device="meta", share_prefix=True)  # the shared-prefix input
    assert {t.device.type for t in tensors_of(shared)} == {"meta"} and shared["prefix_ids"].shape[0] == 3
    text_only = [replace(t, sample=replace(t.sample, images=()), pixel_values=None, image_grid_thw=None)
                 for t in trajectories[:3]]  # the same rows, no image
    blank = collate(text_only, processor, device="meta", blank_image=True)
    assert {t.device.type for t in tensors_of(blank)} == {"meta"}
    assert blank["input_ids"].shape[0] == blank["loss_mask"].shape[0] + 1  # the blank row is model input only
    assert "pixel_values" not in collate(text_only, processor, device="meta")
