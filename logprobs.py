"""From trajectories to per-token log-probs: `collate` (rows padded into
one batch, the images the rollout already processed reused) and `compute_logprobs`, one forward with
the lm_head only where a loss token is predicted, or the shared-prefix forward (the common system
prompt once per micro-batch, each distinct prompt once, its rows continued from its K/V, gradients
flowing through the shared prefix). grpo.py's update and the equality tests read it.
"""

import functools

import torch
from transformers import DynamicCache

from parallel import unwrap
from policy import VISION_TOKENS, is_vision_processor, suppressed_ids, tokenizer_of
from rollout import rope_positions


@functools.lru_cache(maxsize=8)
def _blank_image_inputs(processor):
    """(token ids, pixel_values, image_grid_thw) of the smallest blank image the processor accepts:
    a loss-free row that makes the vision tower run in a micro-batch without images."""
    from PIL import Image
    side = processor.image_processor.patch_size * processor.image_processor.merge_size
    inputs = processor.image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
    merged = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    tokenizer = tokenizer_of(processor)
    ids = tokenizer.convert_tokens_to_ids([VISION_TOKENS["vision_start_token"]]
                                          + [VISION_TOKENS["image_token"]] * merged + [VISION_TOKENS["vision_end_token"]])
    return ids, inputs["pixel_values"], inputs["image_grid_thw"]


def collate(trajectories, processor, device="cpu", blank_image=False, share_prefix=False):
    """Right-padded full sequences (prompt + response) and the images of each row, on `device`.

    Returns, all on `device`:
      loss_mask, old_logprobs (B, L) (column t: value for token t; NaN: trained, not sampled here);
      input_ids, attention_mask (B', L): the model's input, B' = B, or B + 1 with the blank row last;
      pixel_values / image_grid_thw: the rows' images in row order (absent when no row has one);
      targets (N,): the N loss-mask tokens in row-major order, and target_index (N,): their flat
        index into a (B, L-1) grid whose column t is token t+1 (what compute_logprobs fills);
      choice_index {"expert": (K_e, 2), "skill": (K_s, 2)}: (row, column whose NEXT token is the
        choice token of a chosen name), and choice_rows {kind: (K,)}: that column's index among the N;
      choice_candidates {kind: (K, C)} long, choice_mask {kind: (K, C)} float: each position's
        candidate ids (Trajectory.choice_positions), right-padded (mask 0) to the most in the batch;
      suppressed_ids (S,) and num_tokens = N.
    Everything is built as Python lists and created on `device` in one call per tensor: no CPU
    tensor is left to meet the model's output, and no index depends on tensor data (no host sync).
    blank_image: when no row has an image, append one model-input row holding a blank image (no
    loss token, so it adds exactly nothing to the loss or the gradient) and the vision tower runs on
    every rank: DDP and FSDP2 collectives must match across ranks whatever each rank's data.
    share_prefix adds the input of compute_logprobs' shared-prefix forward (_shared_prefix_layout).
    forward_tokens / forward_padded: the tokens the forward will compute, without / with padding.
    """
    tokenizer = tokenizer_of(processor)
    rows = [t.prompt_ids + t.response_ids for t in trajectories]
    masks = [[0] * len(t.prompt_ids) + list(t.loss_mask) for t in trajectories]
    sampled = [[0.0] * len(t.prompt_ids) + list(t.sample_logprobs) for t in trajectories]
    # the images as the rollout's processor call made them (Trajectory.pixel_values): processed once
    pixels = [t.pixel_values for t in trajectories if t.pixel_values is not None]
    grids = [t.image_grid_thw for t in trajectories if t.pixel_values is not None]
    if blank_image and not pixels and is_vision_processor(processor):
        ids, pixel_values, grid = _blank_image_inputs(processor)
        rows.append(ids)
        pixels, grids = [pixel_values], [grid]
    width = max(map(len, rows))
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    targets, target_index, position_of = [], [], {}
    for r, (row, mask) in enumerate(zip(rows, masks)):
        for t in range(1, len(row)):
            if mask[t]:
                position_of[r, t - 1] = len(targets)
                targets.append(row[t])
                target_index.append(r * (width - 1) + t - 1)
    choices, candidates = {"expert": [], "skill": []}, {"expert": [], "skill": []}
    for r, traj in enumerate(trajectories):
        for position, kind, ids in traj.choice_positions:
            choices[kind].append((r, len(traj.prompt_ids) + position - 1))
            candidates[kind].append(list(ids))
    widths = {kind: max(map(len, ids), default=0) for kind, ids in candidates.items()}
    long = dict(dtype=torch.long, device=device)
    batch = {"input_ids": torch.tensor(pad(rows, tokenizer.pad_token_id), **long),
             "attention_mask": torch.tensor(pad([[1] * len(row) for row in rows], 0), **long),
             "loss_mask": torch.tensor(pad(masks, 0), **long).reshape(len(masks), width),
             "old_logprobs": torch.tensor(pad(sampled, 0.0), dtype=torch.float32, device=device).reshape(len(masks), width),
             "targets": torch.tensor(targets, **long), "target_index": torch.tensor(target_index, **long),
             "num_tokens": len(targets),
             "suppressed_ids": torch.tensor(suppressed_ids(processor), **long),
             "choice_index": {k: torch.tensor(v, **long).reshape(-1, 2) for k, v in choices.items()},
             "choice_rows": {k: torch.tensor([position_of[rc] for rc in v], **long) for k, v in choices.items()},
             # padded with the position's first candidate: a real token, so no -inf meets the mask's 0
             "choice_candidates": {k: torch.tensor([c + c[:1] * (widths[k] - len(c)) for c in v], **long)
                                   .reshape(len(v), widths[k]) for k, v in candidates.items()},
             "choice_mask": {k: torch.tensor([[1.0] * len(c) + [0.0] * (widths[k] - len(c)) for c in v],
                                             dtype=torch.float32, device=device).reshape(len(v), widths[k])
                             for k, v in candidates.items()}}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels).to(device)
        batch["image_grid_thw"] = torch.cat(grids).to(device)
    if share_prefix:
        batch.update(_shared_prefix_layout(trajectories, processor, device, blank_image, tokenizer.pad_token_id))
    else:  # real tokens the forward computes, and with its padding (Python numbers: no host sync)
        batch["forward_tokens"], batch["forward_padded"] = sum(map(len, rows)), len(rows) * width
    return batch


def _shared_prefix_layout(trajectories, processor, device, blank_image, pad_id):
    """The model input of a shared-prefix forward: each distinct prompt (same ids, same Sample) once
    ("prefix_ids" / "prefix_mask" (U, C + P), its images "prefix_pixel_values" /
    "prefix_image_grid_thw"), then every row's response right-padded ("suffix_ids" / "suffix_mask"
    (B, R)) continuing from its prompt's K/V ("row_prefix" (B,)). The first "common_len" C columns
    are the tokens every distinct prompt starts with (the system prompt, up to the first vision
    token), computed once; the rest of each prompt follows, left-padded (masked holes). The logit
    that predicts response token 0 is its prompt's last; token j > 0 is predicted by suffix column
    j - 1 ("suffix_predicts" (B, R)). "logit_source" (N,) puts [row first logits (B); suffix
    logits (M)] in target order."""
    prompts, row_prefix = {}, []
    for t in trajectories:
        row_prefix.append(prompts.setdefault((tuple(t.prompt_ids), id(t.sample)), len(prompts)))
    firsts = {}
    for r, t in enumerate(trajectories):
        firsts.setdefault(row_prefix[r], t)
    unique = [list(firsts[u].prompt_ids) for u in range(len(prompts))]
    pixels = [firsts[u] for u in range(len(prompts)) if firsts[u].pixel_values is not None]
    images = ([t.pixel_values for t in pixels], [t.image_grid_thw for t in pixels])
    if blank_image and not pixels and is_vision_processor(processor):
        ids, pixel_values, grid = _blank_image_inputs(processor)
        unique.append(ids)
        images = ([pixel_values], [grid])
    common = _common_length(unique, set(suppressed_ids(processor)))
    # at least one (masked) suffix column: rows whose turns upstream's loop all dropped have no response,
    # and the suffix forward must run all the same (as on the other ranks, and for their first logits)
    width, length = max(map(len, unique)) - common, max(1, *(len(t.response_ids) for t in trajectories))
    predicts, source, seen = [], [], 0  # seen: suffix logits of the rows before, in row-major order
    for r, t in enumerate(trajectories):  # the targets in collate's order: row by row, token by token
        row = [False] * length
        for j, flag in enumerate(t.loss_mask):
            if flag and j == 0:
                source.append(r)
            elif flag:
                row[j - 1] = True
                source.append(len(trajectories) + seen)
                seen += 1
        predicts.append(row)
    long = dict(dtype=torch.long, device=device)
    rests = [u[common:] for u in unique]
    layout = {"forward_tokens": common + sum(map(len, rests)) + sum(len(t.response_ids) for t in trajectories),
              "forward_padded": common + len(unique) * width + len(trajectories) * length,
              "common_len": common,
              "prefix_ids": torch.tensor([u[:common] + [pad_id] * (width - len(r)) + r for u, r in zip(unique, rests)], **long),
              "prefix_mask": torch.tensor([[1] * common + [0] * (width - len(r)) + [1] * len(r) for r in rests], **long),
              "row_prefix": torch.tensor(row_prefix, **long),
              "suffix_ids": torch.tensor([t.response_ids + [pad_id] * (length - len(t.response_ids))
                                          for t in trajectories], **long),
              "suffix_mask": torch.tensor([[1] * len(t.response_ids) + [0] * (length - len(t.response_ids))
                                           for t in trajectories], **long),
              "suffix_predicts": torch.tensor(predicts, dtype=torch.bool, device=device),
              "logit_source": torch.tensor(source, **long)}
    if images[0]:
        layout["prefix_pixel_values"] = torch.cat(images[0]).to(device)
        layout["prefix_image_grid_thw"] = torch.cat(images[1]).to(device)
    return layout


def _common_length(prompts, vision_ids):
    """How many leading tokens all `prompts` (lists of ids) share, stopping before the first vision
    token (equal image tokens may hold different pixels) and leaving each prompt at least one token
    of its own (its last logit predicts its rows' first token). 0 for fewer than two prompts."""
    if len(prompts) < 2:
        return 0
    common = 0
    for column in zip(*prompts):
        if column[0] in vision_ids or any(token != column[0] for token in column):
            break
        common += 1
    return min(common, min(map(len, prompts)) - 1)


def compute_logprobs(model, batch, temperature=1.0, with_choices=False):
    """One forward (with images) over a collated batch (collate(..., device=the model's)).

    Positions come from get_rope_index over the right-padded sequences (they equal the positions
    used when sampling). The lm_head only runs at the positions that predict a loss-mask token, so
    full-vocabulary logits are never materialized for the whole sequence. A batch collated with
    share_prefix runs each distinct prompt once (shared_prefix_logits): the same log-probs and
    gradients (tests/test_grpo_forward.py), fewer tokens through the model.
    Returns logprobs_from_logits of those (N, V) logits (with_choices: the routing candidates' too).
    """
    if "prefix_ids" in batch:
        return logprobs_from_logits(shared_prefix_logits(model, batch), batch, temperature, with_choices)
    predicts = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # t predicts loss-mask token t+1
    predicts[:batch["loss_mask"].shape[0], :-1] = batch["loss_mask"][:, 1:].bool()  # (a blank image row predicts nothing)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    positions, _ = rope_positions(model, batch["input_ids"], batch["attention_mask"], images.get("image_grid_thw"))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                use_cache=False, logits_to_keep=predicts, **images)
    return logprobs_from_logits(out.logits, batch, temperature, with_choices)


def shared_prefix_logits(model, batch):
    """The (N, V) logits of compute_logprobs from a prompt-once forward: the distinct prompts are
    prefilled into a KV cache (their last logits predict each row's first response token), the
    cache is gathered per row, and the responses run on top of it. Gradients reach the prompts
    through the cache. Positions continue as in sampling: cumsum(attention) - 1 + the prompt's
    mRoPE delta (rollout.feed). Activation checkpointing turns the KV cache off inside the model, so
    it is refused here (update_policy falls back to the full forward)."""
    if unwrap(model).is_activation_checkpointing:
        raise ValueError("the shared-prefix forward continues rows from a KV cache, which activation checkpointing "
                         "turns off; collate without share_prefix")
    images = {k.removeprefix("prefix_"): batch[k] for k in ("prefix_pixel_values", "prefix_image_grid_thw") if k in batch}
    positions, deltas = rope_positions(model, batch["prefix_ids"], batch["prefix_mask"], images.get("image_grid_thw"))
    cache, common = DynamicCache(config=unwrap(model).config.get_text_config()), batch["common_len"]
    outputs = []  # logits of every forward stay in the graph: FSDP2 unshards a layer for backward when
    if common:    # the gradient of its output arrives, also where only its K/V are used
        # the start every prompt shares, once, then copied per prompt (a differentiable repeat)
        outputs.append(model(input_ids=batch["prefix_ids"][:1, :common], attention_mask=batch["prefix_mask"][:1, :common],
                             position_ids=positions[..., :1, :common], cache=cache, use_cache=True,
                             logits_to_keep=1).logits[:, -1])
        cache.batch_repeat_interleave(batch["prefix_ids"].shape[0])
    out = model(input_ids=batch["prefix_ids"][:, common:], attention_mask=batch["prefix_mask"],
                position_ids=positions[..., common:], cache=cache, use_cache=True, logits_to_keep=1, **images)
    rows = batch["row_prefix"]
    first = out.logits[:, -1][rows]  # (B, V)
    cache.batch_select_indices(rows)  # a differentiable gather: the prompt's K/V once per row
    attention = torch.cat([batch["prefix_mask"][rows], batch["suffix_mask"]], dim=1)
    suffix_positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -batch["suffix_ids"].shape[1]:] + deltas[rows]
    if positions.dim() == 3:  # mRoPE: text positions are equal in all three sections
        suffix_positions = suffix_positions.expand(3, -1, -1)
    out = model(input_ids=batch["suffix_ids"], attention_mask=attention, position_ids=suffix_positions, cache=cache,
                use_cache=True, logits_to_keep=batch["suffix_predicts"])
    return torch.cat([first, out.logits, *outputs])[batch["logit_source"]]


def logprobs_from_logits(logits, batch, temperature=1.0, with_choices=False):
    """The training-side log-probs from the (N, V) logits of the N positions that predict a
    loss-mask token, in row-major order (what compute_logprobs' forward returns). Only index
    operations of known size: no tensor data decides a shape.

    Returns {"logprobs": (B, L-1) float32, column t = log-prob of token t+1 (0 where loss_mask[:, 1:] is 0),
             "choice_logprobs": {"expert": (K_e, C_e), "skill": (K_s, C_s)} with_choices: at each choice
             position, the log-probs of its candidates (batch["choice_candidates"])}.
    """
    batch_size, length = batch["loss_mask"].shape
    logits = logits.float().index_fill(1, batch["suppressed_ids"], float("-inf"))
    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)  # (N, V)
    token_logprobs = logprobs_all.gather(1, batch["targets"][:, None]).squeeze(1)
    grid = torch.zeros(batch_size * (length - 1), dtype=token_logprobs.dtype, device=token_logprobs.device)
    result = {"logprobs": grid.index_copy(0, batch["target_index"], token_logprobs).view(batch_size, length - 1)}
    if with_choices:
        result["choice_logprobs"] = {kind: logprobs_all[rows].gather(1, batch["choice_candidates"][kind])
                                     for kind, rows in batch["choice_rows"].items()}
    return result
