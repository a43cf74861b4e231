"""Train the orchestration policy with GRPO: multi-turn rollouts against frozen experts and skills.

    python train.py                                       # the toy-world main job (configs/train_toy.json)
    python train.py --steps 50 --out out/quick            # any setting can be overridden
    torchrun --standalone --nproc_per_node 8 train.py --world data --model /path/to/Qwen3-VL-4B \\
        --train_data a.parquet --test_data b.parquet      # the paper setting: the defaults below
    python train.py --resume auto --out out/toy           # continue exactly from the latest checkpoint

The defaults are the paper's setting (Qwen3-VL-4B-Thinking, lr 1e-6, one prompt x 8 rollouts per step,
FSDP2, no KL, no barrier). The world (data.load_world) supplies everything world-specific: registry,
expert backends, train and test samples, the request a demonstration sends, the goal, a from-scratch
policy. `--world toy` (the default) is the main job: its settings, configs/train_toy.json, lie over
the defaults and under --config and flags. It builds a tiny Qwen3-VL from scratch, teaches it the
action format on demonstrations with uniformly random (expert, skill) pairs, lets GRPO learn which
pair to call for which question, and evaluates it against the closed-form baselines.

One GRPO step, per rank (train_step):
  1. take this rank's slice of the step's prompts x group_size rows and roll them out;
  2. score every trajectory (eval.record); all-gather the records, group advantages;
  3. grpo.update_policy: ppo_epochs optimizer steps over length-sorted micro-batches, normalized by
     the token count of the whole step on all ranks (the update does not depend on world size).

Config: DEFAULTS < the world's preset < JSON files (--config) < --key value flags (config.py).
"""
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import eval as evaluation
import plots
from config import parse_config, show_help
from data import load_world, with_views
from environment import demonstration_turns, make_environment
from grpo import StepBatch, UpdateConfig, group_advantages, sft_step, update_policy
from parallel import (Ranks, autocast, check_memory, full_optimizer_state, full_params, full_state_dict, is_fsdp,
                      load_optimizer, memory_estimate, peak_memory_mb, rng_state, set_rng_state, unwrap, wrap_model)
from policy import load_policy
from rollout import DECODE_MODES, RolloutConfig, rollout, trajectory_from_texts
from scoring import RewardConfig

# -----------------------------------------------------------------------------------------------
# Defaults: the paper's setting. The toy main job's own settings are configs/train_toy.json, each
# with the measured reason for it in the README ("The toy world").
DEFAULTS = dict(
    world="toy",               # toy: the main job (its preset applies) | data: files + HTTP experts (data.load_world)
    # run
    out="out/paper",           # checkpoints in out/ckpt_NNNNNN, final policy in out/final, results in out/results.json
    seed=0,
    resume="",                 # "" | a checkpoint directory | "auto" (latest under out)
    threads=0,                 # torch CPU threads (0: leave torch's default)
    # policy
    model="Qwen/Qwen3-VL-4B-Thinking",  # an HF directory or Hub id; "" builds the world's policy from scratch
    policy_size="toy",         # from-scratch policy size ("tiny" | "toy" | "small")
    # world: registry, data, experts
    registry="configs/paper.json",
    train_data="data/maestro_train.parquet",  # comma-separated JSONL / parquet paths
    test_data="data/maestro_test.parquet",
    prompt="stored",           # stored: a data row's own prompt when it has one (what a checkpoint was trained
                               # with), else the registry's; registry: always the registry's (registry swaps)
    num_train=8000,            # generated training samples (toy world)
    num_test=1000,             # test samples used for evaluation (first N)
    experts="http",            # http: the registry's URLs (or expert_url) | toy: in-process toy experts (toy world)
    expert_url="",             # one OpenAI-compatible URL for every expert
    stratify=False,            # equal numbers of prompts per family (Sample.family) in every step
    registry_views="",         # 'A-B': each prompt group sees its own renamed view (expert-N / skill-N, N in A..B)
    heldout_registry="",       # with views: no id of this registry's names is drawn (names never seen in training)
    view_growth_steps=0,       # with views: GRPO views grow from 2 choices to the whole registry over these steps
    # rollout
    prompts_per_step=1,        # global, across ranks
    group_size=8,
    protocol="ours",           # the turn loop: ours | upstream (the released checkpoint's: maestro.upstream_edit)
    max_turns=0,               # expert calls per trajectory; 0: the registry prompt's max_calls
    max_turn_tokens=2048,
    max_response_tokens=4096,
    obs_tokens=1024,           # token budget of one observation (head and tail kept around a marker)
    decode="dynamic",          # KV cache of the rollout: dynamic | static | compiled (static + torch.compile, CUDA graphs)
    temperature=1.0,
    format_penalty=-1.0,
    reward="strict",           # strict: our matching of the policy's last answer; upstream: upstream's per-source
                               # scorers on the whole response, observations included (gameable: README)
    # supervised format warm-up on random-pair demonstrations (data.World: any world has them)
    sft_steps=0,               # cap; 0 skips the warm-up
    sft_batch=64,              # global demonstrations per step
    sft_pool=2048,             # distinct demonstrations, drawn with replacement each step
    sft_lr=1e-5,
    sft_eval_every=50,
    sft_stop_valid=0.98,       # stop once the sampled format-valid rate reaches this (the anchor keeps training it)
    # GRPO
    steps=380,
    lr=1e-6,
    weight_decay=0.01,
    beta1=0.9,
    beta2=0.999,
    grad_clip=1.0,             # 0 disables clipping (the norm is still logged)
    ppo_epochs=1,              # optimizer steps per rollout batch; 1 = on-policy (ratio exactly 1)
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=3.0,             # 0 disables the dual clip
    loss_agg="token-mean",     # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    scale_by_std=True,         # False: Dr. GRPO advantages (centred only)
    drop_zero_adv=False,       # skip rows with zero advantage (no signal; saves the forward/backward only)
    barrier=0.0,               # routing log-barrier weight (grpo.choice_barrier)
    barrier_on_failures=False,  # scale each rollout's barrier by its group's failure rate
    kl_coef=0.0,               # > 0 adds a frozen reference model and a KL loss
    kl_kind="k3",
    anchor=0.0,                # weight of the demonstrations' NLL, routing choices left out, in each GRPO step
    anchor_batch=16,           # global demonstrations per GRPO step for the anchor
    micro_batch_tokens=16384,  # padded tokens per micro-batch (rows are length-sorted)
    share_prefix=True,         # a group's prompt once in the training forward (not under grad_checkpointing)
    # evaluation and stopping
    eval_every=20,
    eval_n=256,                # test questions in the periodic sampled evaluation
    eval_gate=0.0,             # with a goal: skip a periodic evaluation while the training rollouts' accuracy since
                               # the last one is more than this below the goal (0: evaluate every eval_every steps)
    goal="",                   # stop early at this sampled accuracy; "auto": the world's goal; "": never
    stop_evals=1,              # with a goal: periodic evaluations in a row that must meet it to stop the job
    stop_valid=0.0,            # with a goal: the format-valid rate a stopping evaluation must also reach
    time_budget_s=0.0,         # wall-clock cap of the GRPO phase (0: none)
    eval_greedy=False,         # final evaluation: greedy instead of sampled
    # checkpoints
    save_every=20,
    keep_checkpoints=3,
    # parallelism and precision
    device="auto",             # auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cuda | cpu
    dtype="auto",              # compute dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32;
                               # parameters, gradients and AdamW state stay float32, log-softmax is float32
    parallel="fsdp",           # ddp | fsdp (FSDP2 fully_shard per decoder layer and vision block)
    grad_checkpointing=True,   # activation checkpointing of the decoder layers (recompute in backward)
    dist_timeout_s=3600,       # process-group timeout: the longest any rank waits for the others in a collective
)
CHOICES = {"world": ("toy", "data"), "experts": ("toy", "http"), "prompt": ("stored", "registry"),
           "protocol": ("ours", "upstream"), "decode": DECODE_MODES, "reward": ("strict", "upstream"),
           "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
           "parallel": ("ddp", "fsdp"), "device": ("auto", "cuda", "cpu"), "dtype": ("auto", "bfloat16", "float32")}
PRESETS = {"world": {"toy": str(Path(__file__).resolve().parent / "configs" / "train_toy.json")}}


def read_config(argv):
    """DEFAULTS <- the world's preset <- --config FILE <- --key value flags (config.parse_config)."""
    return parse_config(argv, DEFAULTS, CHOICES, PRESETS)


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


# -----------------------------------------------------------------------------------------------
# One GRPO step

def train_step(model, optimizer, prompts, env, processor, cfg, ranks, rollout_cfg, reward_cfg,
               ref_model=None, anchor_demos=()):
    """One GRPO step on the global prompt list `prompts` (the same on every rank).
    Returns the step's metrics (identical on every rank)."""
    t0 = time.perf_counter()
    G = rollout_cfg.group_size
    lo, hi = ranks.slice(len(prompts) * G)  # rows of one group are contiguous
    if lo % G == 0 and hi % G == 0:  # whole groups: each prompt is prefilled once
        samples, local_cfg = prompts[lo // G:hi // G], rollout_cfg
    else:  # a group split over ranks (e.g. 1 prompt x 8 on 4 GPUs): one row per repeated prompt
        samples, local_cfg = [prompts[i // G] for i in range(lo, hi)], replace(rollout_cfg, group_size=1)
    model.eval()
    with torch.no_grad(), full_params(model) as sampler, autocast(ranks):
        trajectories = rollout(sampler, processor, samples, env, local_cfg)
    t_rollout = time.perf_counter() - t0

    records = ranks.concat(evaluation.record(traj, reward_cfg, env) for traj in trajectories)
    advantages, zero_var = group_advantages(torch.tensor([r["reward"] for r in records]), G,
                                            scale_by_std=cfg["scale_by_std"])
    barrier_weights = None
    if cfg["barrier_on_failures"]:  # 1 - the fraction of the group's rollouts that answered correctly
        correct = torch.tensor([float(r["correct"]) for r in records]).view(-1, G)
        barrier_weights = (1.0 - correct.mean(dim=1)).repeat_interleave(G)[lo:hi]

    t1 = time.perf_counter()
    step = StepBatch(trajectories, advantages[lo:hi], barrier_weights, anchor_demos)
    metrics = update_policy(model, optimizer, step, UpdateConfig.of(cfg), ranks, processor, ref_model)
    t_update = time.perf_counter() - t1
    metrics.update(evaluation.flat_results(evaluation.summarize(records, env.registry)))
    metrics.update(zero_var_groups=zero_var, time_rollout=t_rollout, time_update=t_update,
                   step_time=time.perf_counter() - t0, tokens_per_s=metrics["seq_tokens"] / max(t_update, 1e-9),
                   peak_mem_mb=peak_memory_mb(ranks))
    return metrics


# -----------------------------------------------------------------------------------------------
# The format warm-up: demonstrations of random pairs (environment.demonstration_turns), any world

class DemonstrationPool:
    """A fixed pool of sft_pool random-pair demonstrations on train samples, each built on first use
    (building one costs as much as training on it) and kept, up to KEEP_BUILT of them: one dropped is
    rebuilt from the same (seed, j) (the same demonstration when the experts are deterministic)."""
    KEEP_BUILT = 8192  # ~0.14 MB each (measured): a pool of fresh demonstrations (registry_views) stays near 1 GB

    def __init__(self, processor, world, env, cfg):
        self.processor, self.world, self.env, self.cfg = processor, world, env, cfg
        self.built = {}

    def __getitem__(self, j):
        if j not in self.built:
            if len(self.built) >= self.KEEP_BUILT:
                self.built.pop(next(iter(self.built)))  # the oldest
            rng = random.Random(f"sft/{self.cfg['seed']}/{j}")
            [sample] = with_views([self.world.train[rng.randrange(len(self.world.train))]], self.world.registry,
                                  self.cfg, f"sft/{j}")
            turns, results = demonstration_turns(sample, self.env, rng, self.world.request_of)
            self.built[j] = trajectory_from_texts(self.processor, sample, self.env, turns, results)
        return self.built[j]

    def batch(self, phase, step, lo, hi):
        """This rank's demonstrations [lo, hi) of a step; demonstration i depends on (seed, phase,
        step, i) only, so a global batch is the same for any world size."""
        return [self[random.Random(f"{phase}/{self.cfg['seed']}/{step}/{i}").randrange(self.cfg["sft_pool"])]
                for i in range(lo, hi)]


def run_sft(model, processor, pool, env, test, cfg, ranks, rollout_cfg, log):
    """Supervised warm-up on random-pair demonstrations until the format is learned."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    lo, hi = ranks.slice(cfg["sft_batch"])
    eval_cfg = replace(rollout_cfg, group_size=1)
    for step in range(1, cfg["sft_steps"] + 1):
        demos = pool.batch("sft", step, lo, hi)
        record = {"phase": "sft", "step": step, **sft_step(model, optimizer, demos, processor, UpdateConfig.of(cfg),
                                                           ranks)}
        if step % cfg["sft_eval_every"] == 0 or step == cfg["sft_steps"]:
            results = evaluation.evaluate_sharded(model, processor, test[:min(cfg["eval_n"], 128)], env, eval_cfg, ranks)
            record.update(format_valid_rate=results["format_valid_rate"], accuracy=results["accuracy"])
        log.write(record)
        if step % 10 == 0 or "accuracy" in record:
            ranks.print(f"sft {progress(step, cfg['sft_steps'])} nll {record['nll']:.3f}"
                        + (f" valid {record['format_valid_rate']:.3f} acc {record['accuracy']:.3f}"
                           if "accuracy" in record else ""))
        if record.get("format_valid_rate", 0.0) >= cfg["sft_stop_valid"]:
            break


# -----------------------------------------------------------------------------------------------
# Checkpoints: HF policy dir + optimizer + trainer state, written to a temporary dir then renamed.

def checkpoint_dirs(out):
    return sorted(Path(out).glob("ckpt_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))


def save_policy_dir(model, processor, path, ranks):
    state = full_state_dict(model)  # collective: every rank
    if ranks.master:
        unwrap(model).save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)


def save_checkpoint(model, optimizer, processor, cfg, ranks, step):
    """out/ckpt_{step:06d}/{policy/, optimizer.pt, trainer_state.pt, config.json}; atomic rename."""
    out = Path(cfg["out"])
    final, tmp = out / f"ckpt_{step:06d}", out / f".tmp_ckpt_{step:06d}"
    if ranks.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    save_policy_dir(model, processor, tmp / "policy", ranks)
    optim_state = full_optimizer_state(model, optimizer)
    rng = ranks.gather(rng_state())
    if ranks.master:
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({"step": step, "rng": rng, "world_size": ranks.size}, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        old = out / f".old_ckpt_{step:06d}"
        if final.exists():  # saving the same step again (after a resume): swap, then drop the old one
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoint_dirs(out)[:-cfg["keep_checkpoints"]] if cfg["keep_checkpoints"] > 0 else []:
            shutil.rmtree(stale)
    ranks.barrier()


def resolve_resume(cfg):
    if cfg["resume"] != "auto":
        return Path(cfg["resume"])
    found = checkpoint_dirs(cfg["out"])
    if not found:
        raise FileNotFoundError(f"--resume auto: no checkpoint (ckpt_NNNNNN) under {cfg['out']}")
    return found[-1]


# -----------------------------------------------------------------------------------------------
# Logging: metrics.jsonl (rank 0) and one console line per step

class MetricsLog:
    """JSONL, one flushed line per record (rank 0), each with elapsed_s: wall seconds since opened. A
    resumed run keeps the records up to its checkpoint; a fresh run starts the file anew."""

    def __init__(self, path, ranks, resume_step=None):
        self.path, self.file, self.opened = Path(path), None, time.perf_counter()
        if not ranks.master:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = []  # drop a half-written last line and anything after the checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("phase") == "sft" or record.get("step", 0) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a" if resume_step is not None else "w", buffering=1)

    def write(self, record):
        if self.file:
            self.file.write(json.dumps({**record, "elapsed_s": round(time.perf_counter() - self.opened, 2)}) + "\n")
            self.file.flush()


def progress(step, total, width=20):
    done = int(width * step / max(total, 1))
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total}"


def console_line(step, total, m):
    top = max((v for k, v in m.items() if k.endswith("/max_pair_share")), default=0.0)
    errors = sum(v for k, v in m.items() if k.startswith("errors/"))  # failed calls: a dead expert shows here
    return (f"{progress(step, total)} reward {m['mean_reward']:+.3f} acc {m['accuracy']:.3f} errors {errors} "
            f"valid {m['format_valid_rate']:.3f} turns {m['mean_turns']:.2f} zero-var {m['zero_var_groups']} "
            f"clip {m.get('clipfrac_high', 0):.3f}/{m.get('clipfrac_low', 0):.3f} kl {m.get('approx_kl', 0):.2e} "
            f"gnorm {m['grad_norm']:.3f} top-pair {top:.2f} {m['tokens_per_s']:.0f} tok/s "
            f"{m['step_time']:.2f}s {m['peak_mem_mb']:.0f}MB")


# -----------------------------------------------------------------------------------------------
# The job

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, DEFAULTS):
        return
    try:  # a bad flag, config file, registry or data file: a message, not a traceback
        cfg = read_config(argv)
        ranks = Ranks(cfg["device"], cfg["dtype"], cfg["dist_timeout_s"])
        world = load_world(cfg)
        if not world.train and cfg["steps"] + cfg["sft_steps"] > 0:
            raise ValueError("config key 'train_data': this world has no training samples")
        if cfg["stop_evals"] < 1:
            raise ValueError(f"config key 'stop_evals': expected 1 or more, got {cfg['stop_evals']}")
        if cfg["registry_views"] and cfg["barrier"] > 0:
            raise ValueError("config key 'barrier': the routing barrier scores one token per name, and view names "
                             "(expert-N) can part from the others at both digits; set barrier 0 with registry_views")
        world = replace(world, test=with_views(world.test, world.registry, cfg, "test"))
    except (ValueError, OSError) as error:
        sys.exit(f"train.py: {error}")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out"])
    if ranks.master:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(cfg, indent=2), flush=True)

    # ---- policy, environment
    resume_dir = resolve_resume(cfg) if cfg["resume"] else None
    for seed_generator in (torch.manual_seed, random.seed, np.random.seed):
        seed_generator(cfg["seed"] + ranks.rank)
    if resume_dir is not None or cfg["model"]:
        model, processor = load_policy(resume_dir / "policy" if resume_dir else cfg["model"])
    elif world.build_policy is not None:
        model, processor = world.build_policy(cfg["policy_size"], cfg["seed"])
    else:
        sys.exit(f"train.py: the {cfg['world']} world cannot build a policy from scratch; pass --model")
    if ranks.device.type == "cuda":
        plan = memory_estimate(sum(p.numel() for p in model.parameters()), model.config.get_text_config(), cfg,
                               ranks.size, torch.finfo(ranks.dtype).bits // 8)
        try:
            warning = check_memory(plan, torch.cuda.get_device_properties(ranks.device).total_memory / 2 ** 30)
        except ValueError as error:
            sys.exit(f"train.py: {error}")
        if warning:
            ranks.print(warning)
    model.to(ranks.device)
    env = make_environment(world, getattr(processor, "tokenizer", processor), cfg["protocol"], cfg["obs_tokens"])
    rollout_cfg = RolloutConfig(group_size=cfg["group_size"], max_turns=cfg["max_turns"] or None,
                                max_turn_tokens=cfg["max_turn_tokens"], max_response_tokens=cfg["max_response_tokens"],
                                temperature=cfg["temperature"], protocol=cfg["protocol"], decode=cfg["decode"])
    reward_cfg = RewardConfig(format_penalty=cfg["format_penalty"], scorer=cfg["reward"])
    goal = world.goal if cfg["goal"] == "auto" else float(cfg["goal"]) if cfg["goal"] else None

    model = wrap_model(model, cfg, ranks)
    if cfg["decode"] == "compiled" and is_fsdp(model):
        sys.exit("train.py: --decode compiled does not run under FSDP2 (its unshard hooks run inside the forward); "
                 "use --parallel ddp or --decode static")
    state = None if resume_dir is None else torch.load(resume_dir / "trainer_state.pt", weights_only=True)
    log = MetricsLog(out / "metrics.jsonl", ranks, resume_step=None if state is None else state["step"])

    # ---- supervised warm-up (skipped when resuming: checkpoints are taken after it)
    pool = DemonstrationPool(processor, world, env, cfg)
    if state is None and cfg["sft_steps"] > 0:
        run_sft(model, processor, pool, env, world.test, cfg, ranks, rollout_cfg, log)

    # ---- GRPO (the KL reference, if any, is the policy GRPO starts from, kept in out/reference)
    ref_model = None
    if cfg["kl_coef"] > 0:
        if state is None:
            save_policy_dir(model, processor, out / "reference", ranks)
            ranks.barrier()
        ref_model = load_policy(out / "reference", dtype=ranks.dtype, device=ranks.device)[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"])
    step = 0
    if state is not None:
        if state["world_size"] != ranks.size:
            raise ValueError(f"{resume_dir} was written by {state['world_size']} ranks; resume it with as many "
                             f"(this run has {ranks.size}) so every rank gets its RNG state back")
        load_optimizer(model, optimizer, resume_dir / "optimizer.pt", ranks)
        set_rng_state(state["rng"][ranks.rank])
        step = state["step"]
        ranks.print(f"resumed from {resume_dir} at step {step}")
    else:
        save_checkpoint(model, optimizer, processor, cfg, ranks, 0)

    eval_cfg = replace(rollout_cfg, group_size=1)
    t_start, train_accuracy, in_a_row = time.perf_counter(), [], 0
    while step < cfg["steps"]:
        prompts = with_views(prompts_for_step(world.train, step, cfg), world.registry, cfg, f"grpo/{step}", step)
        anchor_demos = pool.batch("anchor", step, *ranks.slice(cfg["anchor_batch"])) if cfg["anchor"] > 0 else ()
        m = train_step(model, optimizer, prompts, env, processor, cfg, ranks, rollout_cfg, reward_cfg,
                       ref_model, anchor_demos)
        step += 1
        log.write({"phase": "grpo", "step": step, **m})
        ranks.print(console_line(step, cfg["steps"], m))
        stop = cfg["time_budget_s"] > 0 and time.perf_counter() - t_start > cfg["time_budget_s"]
        train_accuracy.append(m["accuracy"])  # the same on every rank (records are gathered): so is the gate
        due = cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0
        if due:
            recent, train_accuracy = float(np.mean(train_accuracy)), []
            due = goal is None or cfg["eval_gate"] <= 0 or recent >= goal - cfg["eval_gate"]
            in_a_row = in_a_row if due else 0
            if not due:
                ranks.print(f"eval step {step} skipped: training accuracy {recent:.3f} < goal {goal:.3f} - eval_gate")
        if due:
            results = evaluation.evaluate_sharded(model, processor, world.test[:cfg["eval_n"]], env, eval_cfg, ranks)
            log.write({"phase": "eval", "step": step, **evaluation.flat_results(results)})
            accuracy, valid = results["accuracy"], results["format_valid_rate"]
            in_a_row = in_a_row + 1 if goal is not None and accuracy >= goal and valid >= cfg["stop_valid"] else 0
            ranks.print(f"eval step {step}: sampled accuracy {accuracy:.3f} valid {valid:.3f}" + ("" if goal is None else
                        f" (stop at {goal:.3f}: {in_a_row} of {cfg['stop_evals']} in a row)"))
            stop = stop or in_a_row >= cfg["stop_evals"]
        stop = bool(ranks.broadcast(stop))
        if step % cfg["save_every"] == 0 or step == cfg["steps"] or stop:
            save_checkpoint(model, optimizer, processor, cfg, ranks, step)
        if stop:
            break

    # ---- final policy and evaluation
    save_policy_dir(model, processor, out / "final", ranks)
    final_cfg = replace(eval_cfg, greedy=cfg["eval_greedy"])
    results = evaluation.evaluate_sharded(model, processor, world.test, env, final_cfg, ranks, baselines=True,
                               registry=world.registry)
    if ranks.master:
        results["train"] = {"grpo_steps": step, "config": cfg}
        evaluation.write_results(results, out)
        plots.learning_curve(out / "metrics.jsonl", out / "learning_curve.png")
    ranks.barrier()


if __name__ == "__main__":
    main()
    if dist.is_initialized():  # here, not in main(): a caller that runs main() twice keeps its group
        dist.destroy_process_group()
