"""Distributed plumbing, in one place: which rank this is and the collectives (Ranks), DDP or FSDP2
around the model, gradient synchronisation once per optimizer step, full parameters for sampling,
mixed precision, the memory a config needs, and the state a checkpoint must carry per rank.

One process (plain `python train.py`) needs no process group: every collective is the identity.
Under torchrun, even with one process, the process group is NCCL on CUDA and gloo on CPU
(tests/dist_check.py runs gloo), and the model is wrapped in DDP or FSDP2.
"""
import contextlib
import datetime
import os
import random
import resource

import numpy as np
import torch
import torch.distributed as dist


class Ranks:
    """This process's place in the distributed job (rank, world size, device, compute dtype) and the
    collectives; with one process (no torchrun) every collective is the identity."""

    def __init__(self, device="auto", dtype="auto", timeout_s=3600, alone=False):
        """alone: this process by itself whatever torchrun says (a single-process evaluation)."""
        self.rank = 0 if alone else int(os.environ.get("RANK", 0))
        self.size = 1 if alone else int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = 0 if alone else int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("config key 'device': cuda was asked for but torch sees no CUDA device")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        self.dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
                      "float32": torch.float32}[dtype]
        if cuda:
            torch.cuda.set_device(self.device)
        launched = not alone and "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun, one process too
        if launched and not dist.is_initialized():
            # NCCL's watchdog aborts a collective after `timeout`; ranks wait in collectives while
            # another finishes its rollout or evaluation shard, so this bounds the slowest expert stall
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.master = self.rank == 0

    def print(self, text):
        """Print on rank 0 only: the job's console."""
        if self.master:
            print(text, flush=True)

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

    def slice(self, n):
        """This rank's contiguous share [lo, hi) of n global rows (n must split evenly)."""
        if n % self.size:
            raise ValueError(f"{n} rows cannot be split evenly over {self.size} ranks; make "
                             "prompts_per_step * group_size (and sft_batch) a multiple of the world size")
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def shard(self, items):
        """This rank's contiguous share of `items` (any length); the shards in rank order are `items`."""
        per, extra = divmod(len(items), self.size)
        lo = self.rank * per + min(self.rank, extra)
        return list(items[lo:lo + per + (self.rank < extra)])

    def concat(self, values):
        """The concatenation over ranks (in rank order) of each rank's list `values`, on every rank."""
        return [v for part in self.gather(list(values)) for v in part]


def is_fsdp(model):
    return hasattr(model, "unshard") and hasattr(model, "reshard")


def unwrap(model):
    """The HF model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return getattr(model, "module", model)


def wrap_model(model, cfg, ranks):
    """DDP (default) or FSDP2 around `model` under torchrun; the model itself without a process group.

    Parameters stay float32 (the optimizer's master copy). FSDP2 gathers them in the compute dtype
    and reduces gradients in float32 (MixedPrecisionPolicy); DDP and a single process compute under
    autocast (see `autocast`). Every micro-batch runs the vision tower on every rank (collate's
    blank image), so no parameter is ever unused and DDP needs no unused-parameter search."""
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not dist.is_initialized():
        return model
    if cfg["parallel"] == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if ranks.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(ranks.device.type, (ranks.size,))
    precision = MixedPrecisionPolicy(param_dtype=ranks.dtype, reduce_dtype=torch.float32)
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
    micro-batch's tokens predicted). Keys are float32 where the parameters are (DDP, one process):
    Qwen3's k_norm multiplies its float32 weight into them, and a multiplication is not autocast. A KL
    reference (kl_coef > 0) is a full copy in the compute dtype on every rank. Returns {item: GiB,
    "certain": parameters + gradients + AdamW state, "total": the larger of the rollout phase and the
    update phase}."""
    gib, shards = 2 ** 30, world_size if cfg["parallel"] == "fsdp" else 1
    t = text_config
    key_bytes = dtype_bytes if shards > 1 else 4
    per_token_kv = t.num_hidden_layers * t.num_key_value_heads * t.head_dim * (key_bytes + dtype_bytes)
    rows = max(cfg["prompts_per_step"] * cfg["group_size"] // world_size, 1, EVAL_BATCH)
    layer_values = 12 * t.hidden_size + 3 * t.intermediate_size
    per_token_act = (t.num_hidden_layers * t.hidden_size + layer_values if cfg["grad_checkpointing"]
                     else t.num_hidden_layers * layer_values) * dtype_bytes
    plan = {"parameters": 4 * num_params / shards / gib, "gradients": 4 * num_params / shards / gib,
            "adamw_state": 8 * num_params / shards / gib,
            "accumulated_gradients": 4 * num_params / gib if shards > 1 else 0.0,  # FSDP2 keeps them in reduce_dtype
            "rollout_parameters": dtype_bytes * num_params / gib,
            "reference_model": dtype_bytes * num_params / gib if cfg["kl_coef"] > 0 else 0.0,
            "kv_cache": rows * (PROMPT_TOKENS + cfg["max_response_tokens"]) * per_token_kv / gib,
            "activations": cfg["micro_batch_tokens"] * per_token_act / gib,
            "logits": cfg["micro_batch_tokens"] / 2 * t.vocab_size * 12 / gib}
    plan["certain"] = plan["parameters"] + plan["gradients"] + plan["adamw_state"]
    # the phases do not overlap: gradients are freed after each optimizer step, the cache after each rollout
    rollout = plan["parameters"] + plan["adamw_state"] + plan["reference_model"] + plan["rollout_parameters"] + plan["kv_cache"]
    update = plan["certain"] + plan["reference_model"] + plan["accumulated_gradients"] + plan["activations"] + plan["logits"]
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
        model.set_reshard_after_forward(False, recurse=False)  # the root's own default: it keeps its
        # parameters (embeddings, lm_head, vision patch embed) from forward to backward


def autocast(ranks):
    """Matmuls in the compute dtype (ranks.dtype); a no-op in float32."""
    if ranks.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(ranks.device.type, dtype=ranks.dtype)


def clip_gradients(model, max_norm):
    """Clip to max_norm (0: no clipping) and return the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def peak_memory_mb(ranks):
    if ranks.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ranks.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def full_state_dict(model):
    """The full (unsharded) model state dict on every rank (FSDP2 gathers), or None for plain/DDP."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def full_optimizer_state(model, optimizer):
    """The full optimizer state dict on CPU (every rank takes part under FSDP2); {} for an optimizer
    that has not stepped, as torch's helper would first take a zero-gradient step that AdamW counts
    (its first real update then 0.74x the size)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    if not optimizer.state:
        return {}
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model, optimizer, path, ranks):
    """Rank 0 reads the full optimizer state and broadcasts it; FSDP2 ranks keep their shards.
    Parameters that never had a gradient have no saved state (strict=False); an empty state (saved
    before the first step) leaves the optimizer fresh."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(path, map_location="cpu", weights_only=True) if ranks.master else {}
    if not ranks.broadcast(bool(state)):
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=ranks.size > 1, strict=False))
