"""Distributed checks of train.py, run by tests/test_train.py (and on GPUs by bench.py --gpu) as

    torchrun --standalone --nproc_per_node 2 tests/dist_check.py MODEL_DIR OUT_DIR

1. One update (2 PPO epochs, several micro-batches, unequal micro-batch counts per rank) of DDP
   and of FSDP2 on a global batch split over the ranks changes the parameters exactly as one
   process does on the whole batch (SGD with lr 1, so the change is the gradient itself); then the
   same with mixed data: rank 0's rows have images, rank 1's are text-only (its micro-batches run
   the vision tower on a blank image, or FSDP2's all-gathers would not match).
2. An FSDP2 train_step whose rollout stops after a different number of decode steps on each rank;
   an evaluation sharded over the ranks (greedy, with baselines) equals the single-process one.
3. The real job (train.main) with FSDP2 and activation checkpointing on mixed image / text-only
   JSONL files: SFT + two GRPO steps, then a resume for a third step; loss finite, checkpoints written.
Each rank writes OUT_DIR/rank{r}.json with what it measured; the test asserts on it.
"""
import copy
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as evaluation  # noqa: E402
import toyworld  # noqa: E402
import train  # noqa: E402
from dataclasses import replace  # noqa: E402
from environment import Environment, demonstration_turns  # noqa: E402
from experts import Services  # noqa: E402
from grpo import StepBatch, UpdateConfig, update_policy  # noqa: E402
from parallel import Ranks, autocast, unwrap, wrap_model  # noqa: E402
from policy import load_policy  # noqa: E402
from rollout import RolloutConfig, trajectory_from_texts  # noqa: E402
from scoring import RewardConfig  # noqa: E402

model_dir, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
world = Ranks()
solo = copy.copy(world)  # the same process seen as a world of one: no collectives
solo.size, solo.rank = 1, 0
report = {}

base, processor = load_policy(model_dir, device=world.device)  # cuda:LOCAL_RANK on GPUs (bench.py --gpu)
registry = __import__("registry").Registry.load("configs/toy.json")
env = Environment(registry, toyworld.toy_backends(registry), Services({}), processor.tokenizer)
rng = random.Random(0)
samples = toyworld.make_samples("train", 8, seed=0)
demos = [trajectory_from_texts(processor, s, env, *demonstration_turns(s, env, rng, toyworld.request_of)) for s in samples]
text_only = [replace(s, images=()) for s in samples[4:]]
mixed = demos[:4] + [trajectory_from_texts(processor, s, env, *demonstration_turns(s, env, rng, toyworld.request_of))
                     for s in text_only]
# rank 1's half has two zero advantages: with drop_zero_adv it runs fewer real micro-batches
advantages = torch.tensor([1.0, -0.5, 0.25, -1.5, 0.0, 2.0, 0.0, -0.75])
cfg = dict(train.read_config([]), ppo_epochs=2, grad_clip=0.0, barrier=0.01, drop_zero_adv=True,
           micro_batch_tokens=2 * max(len(t.prompt_ids) + len(t.response_ids) for t in demos))


def parameters(model):
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in unwrap(model).named_parameters()}


def update_delta(model, run_world, trajectories, adv):
    before = parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = update_policy(model, optimizer, StepBatch(trajectories, adv), UpdateConfig.of(cfg), run_world, processor)
    after = parameters(model)
    return {k: after[k] - before[k] for k in before}, metrics


def save_report():  # after each part: a later failure keeps the figures before it (bench.py --gpu reads them)
    (out / f"rank{world.rank}.json").write_text(json.dumps(report))


lo, hi = world.slice(len(demos))
for data, trajectories in (("", demos), ("mixed_", mixed)):
    reference, ref_metrics = update_delta(copy.deepcopy(base), solo, trajectories, advantages)
    for parallel in ("ddp", "fsdp"):
        model = wrap_model(copy.deepcopy(base), dict(cfg, parallel=parallel), world)
        delta, metrics = update_delta(model, world, trajectories[lo:hi], advantages[lo:hi])
        worst = max(float((delta[k] - reference[k]).abs().max()) for k in reference)
        scale = max(float(reference[k].abs().max()) for k in reference)
        report[data + parallel] = {"max_abs_diff": worst, "max_abs_delta": scale,
                                   "grad_norm": metrics["grad_norm"], "ref_grad_norm": ref_metrics["grad_norm"],
                                   "micro_batches": metrics["micro_batches"], "loss": metrics["loss"],
                                   "ref_loss": ref_metrics["loss"]}

save_report()

# 2. FSDP2 train step with unequal decode lengths per rank (turn budget 3 vs 9 tokens), on one
#    prompt whose group of 4 is split over the ranks (upstream's 1 prompt x 8 on several GPUs)
model = wrap_model(copy.deepcopy(base), dict(cfg, parallel="fsdp"), world)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
rollout_cfg = RolloutConfig(group_size=4, max_turns=1, max_turn_tokens=3 + 6 * world.rank, max_response_tokens=64)
step_cfg = dict(cfg, ppo_epochs=1, drop_zero_adv=False, grad_clip=1.0)
metrics = train.train_step(model, optimizer, samples[:1], env, processor, step_cfg, world, rollout_cfg,
                           RewardConfig())
report["fsdp_step"] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                       "response_tokens": metrics["tokens/policy_mean"], "rows": metrics["train_rows"]}
# after the rollout's full_params, FSDP2's defaults again (private state: torch has no getter): the
# blocks free their parameters after forward, the root keeps its own (no extra all-gather for backward)
def param_group(module):  # torch 2.11 keeps one group per module, later versions a list
    state = module._get_fsdp_state()
    return state._fsdp_param_groups[0] if hasattr(state, "_fsdp_param_groups") else state._fsdp_param_group


reshards = [param_group(m).post_forward_mesh_info is not None for m in model.modules() if hasattr(m, "_get_fsdp_state")]
report["reshard_after_forward"] = {"root": reshards[0], "blocks": all(reshards[1:])}
assert all(math.isfinite(v) for v in report["fsdp_step"].values()), report
save_report()

# an evaluation sharded over the ranks (5 questions: 3 + 2) by the same weights equals one process's
eval_cfg = RolloutConfig(group_size=1, max_turns=1, max_turn_tokens=12, max_response_tokens=96, greedy=True)
questions = samples[:3] + text_only[:2]
same_weights = wrap_model(copy.deepcopy(base), dict(cfg, parallel="fsdp"), world)
sharded = evaluation.evaluate_sharded(same_weights, processor, questions, env, eval_cfg, world, baselines=True,
                                      registry=registry)
with torch.no_grad(), autocast(solo):
    alone = evaluation.evaluate(base, processor, questions, env, eval_cfg, baselines=True, registry=registry, ranks=solo)
keep = ("questions", "trajectories", "accuracy", "format_valid_rate", "mean_turns", "calls", "stop_reasons",
        "errors", "tokens", "baselines")
report["eval"] = {"sharded": {k: sharded[k] for k in keep}, "alone": {k: alone[k] for k in keep}}

# 3. the job itself, with FSDP2 (DDP's checkpoint path is the single-process one): 2 steps, then resume for a 3rd
save_report()
if world.master:  # image rows and text-only rows in separate files: unstratified, so ranks get either kind
    toyworld.write_samples(toyworld.make_samples("train", 8, seed=1), out / "data" / "images.jsonl")
    toyworld.write_samples([replace(s, images=()) for s in toyworld.make_samples("train", 8, seed=2)],
                           out / "data" / "text.jsonl")
world.barrier()
job = ["--model", model_dir, "--out", str(out / "job"), "--parallel", "fsdp", "--sft_steps", "2", "--sft_batch", "4",
       "--sft_eval_every", "100", "--prompts_per_step", "4", "--group_size", "2", "--max_turns", "1",
       "--max_turn_tokens", "6", "--max_response_tokens", "48", "--eval_every", "0", "--stratify", "false",
       "--train_data", f"{out}/data/images.jsonl,{out}/data/text.jsonl",
       "--num_test", "4", "--save_every", "1", "--drop_zero_adv", "false", "--kl_coef", "0.1", "--kl_kind", "k1",
       "--grad_checkpointing", "true",  # the paper setting's activation checkpointing under FSDP2
       "--dtype", "auto"]  # and its bf16 on GPUs (the toy preset pins float32)
train.main(job + ["--steps", "2"])
train.main(job + ["--steps", "3", "--resume", "auto"])
