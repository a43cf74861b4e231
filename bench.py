"""Speed ratios of the rollout engine, each measured within one run (so machine noise cancels).

    python bench.py [--sections a,b,..] [--sizes tiny,small] [--json FILE] [--device cpu] [--threads N]
    python bench.py --gpu       # the GPU check (tiny policy, bf16, torchrun); skipped without CUDA
    python bench.py --memory    # per-GPU memory of the paper setting for Qwen3-VL-4B on 1, 4, 8 GPUs
    python bench.py --time-to-goal  # the main job end to end, seeds 0 and 1: wall seconds, accuracy, baselines

Sections (goal in brackets):
  rollout_vs_generate        tokens/s of one greedy turn of the hand loop over model.generate [>= 1.0]
  cache_reuse_vs_reprefill   4-turn rollout with a ~1500-token system prompt: re-prefilling the whole
                             context every turn over continuing the cache (time ratio) [>= 2.0]
  upstream_edit_refeed_vs_reprefill  after a turn that upstream's loop rewrites: re-prefilling the whole
                             context over masking the turn in the cache and feeding what was kept (time ratio)
  group_prefill_saving       prefilling 8 copies of each prompt over prefilling it once and repeating
                             the cache for the group (time ratio)
  loop_overhead              share of rollout wall time outside model.forward and env.step [<= 0.15]
  expert_concurrency         wall time of 16 concurrent skill calls to a loopback OpenAI-compatible
                             server answering after 200 ms, over 200 ms [<= 1.5]
  train_forward_shared_vs_full  forward + backward of a toy-shaped GRPO step (32 prompts x 8 rows):
                             every row in full over each prompt once + rows from its K/V [>= 2.0]
  rollout_compaction         the share of rollout time saved by setting rows whose turn has ended aside
                             from the decode steps, on a toy-shaped rollout [report]
  compiled_decode_vs_dynamic greedy decode tokens/s of the static KV cache with a torch.compile'd step
                             over the dynamic cache, and whether their tokens are equal [report]
The policies are randomly initialised tiny (~0.3M) and small (~2.5M) Qwen3-VLs, batch 16 = 2 prompts x 8.
"""
import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

import grpo
import logprobs
import maestro
import rollout as engine
from chatserver import OpenAICompatServer
from data import Sample
from environment import Environment
from experts import Reply, Services, build_backends
from maestro import Action, format_answer, format_call, system_prompt
from policy import build_policy, build_processor, build_prompt, build_tokenizer, chat_messages, suppressed_ids
from registry import Registry

GROUP, PROMPTS, SYSTEM_TOKENS, REPEATS = 8, 2, 1500, 3
REGISTRY = {
    "experts": [{"name": "Bar-Reader", "description": "reads bar charts", "base_url": "http://127.0.0.1:9/v1"},
                {"name": "Shape-Counter", "description": "counts shapes", "base_url": "http://127.0.0.1:9/v1"}],
    "skills": [{"name": "Read_Bar", "level": 1, "description": "bar values", "implementation": "toy:read_bar"},
               {"name": "Count_Shapes", "level": 1, "description": "counting", "implementation": "toy:count_shapes"}],
}


class InstantExpert:
    """In-process expert that answers at once, so rollout benches time the policy, not the experts."""

    def __init__(self, name):
        self.name = name

    def chat(self, text, images=(), system=None, **generation):
        return Reply("The value of the bar is 7, read from the axis.", len(text.split()), 10, 0.0)


@dataclass
class Setup:
    model: object
    processor: object
    env: Environment
    samples: list


def long_system_prompt(registry, tokenizer):
    """The registry's system prompt padded with extra guideline lines to about SYSTEM_TOKENS tokens."""
    lines, number = [system_prompt(registry)], 0
    while len(tokenizer("\n".join(lines))["input_ids"]) < SYSTEM_TOKENS:
        number += 1
        lines.append(f"- Guideline {number}: if the figure shows item {number * 7 % 97}, compare it with "
                     f"item {number * 13 % 89} before you decide which expert to call.")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def setup(size, device):
    registry = Registry.from_dict(REGISTRY)
    corpus = [system_prompt(registry), "What is the value of bar C? How many shapes are there?",
              format_call("Bar-Reader", "Read_Bar", "value", spaced=True) + " " + format_answer(" 7 ")]
    processor = build_processor(build_tokenizer(corpus, extra_tokens=(maestro.CALL_SEPARATOR,)))
    system = long_system_prompt(registry, processor.tokenizer)
    samples = [Sample(id=f"bench{i}", question=question, images=(Image.new("RGB", size_px, (60 * i, 120, 200)),),
                      ground_truths=("7",), data_source="bench",
                      prompt=({"role": "system", "content": system},
                              {"role": "user", "content": "<image>" + question}))
               for i, (question, size_px) in enumerate([("What is the value of bar C?", (64, 64)),
                                                         ("How many shapes are there?", (96, 48))])]
    model = build_policy(processor, size, seed=0).to(device)
    env = Environment(registry, {name: InstantExpert(name) for name in registry.experts}, Services({}),
                      processor.tokenizer, obs_token_budget=256)
    return Setup(model, processor, env, samples[:PROMPTS])


def timed(fn, repeats=REPEATS):
    """(median seconds, last result) over `repeats` runs after one warm-up run."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def seeded_rollout(s, cfg):
    torch.manual_seed(0)
    return engine.rollout(s.model, s.processor, s.samples, s.env, cfg)


# ----------------------------------------------------------------------------------------------
# Sections: each takes (size, device) and returns a dict of numbers

def rollout_vs_generate(size, device):
    s = setup(size, device)
    tokenizer = s.processor.tokenizer
    cfg = engine.RolloutConfig(group_size=GROUP, max_turns=0, max_turn_tokens=64, greedy=True)
    loop_s, trajectories = timed(lambda: seeded_rollout(s, cfg))
    loop_tokens = sum(len(t.response_ids) for t in trajectories)

    texts = [s.processor.apply_chat_template(chat_messages(s.processor, s.env.registry, sample),
                                             add_generation_prompt=True, tokenize=False) for sample in s.samples]
    inputs = s.processor(text=[t for t in texts for _ in range(GROUP)],
                         images=[sample.images[0] for sample in s.samples for _ in range(GROUP)],
                         padding=True, return_tensors="pt").to(device)
    end_of_turn = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def generate():
        with torch.no_grad():
            return s.model.generate(**inputs, do_sample=False, max_new_tokens=64, tokenizer=tokenizer,
                                    stop_strings=list(maestro.STOP_STRINGS), eos_token_id=end_of_turn,
                                    pad_token_id=tokenizer.pad_token_id,
                                    suppress_tokens=suppressed_ids(s.processor))
    generate_s, out = timed(generate)
    generate_tokens = int((out[:, inputs["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())
    loop_rate, generate_rate = loop_tokens / loop_s, generate_tokens / generate_s
    return {"loop_tokens_per_s": loop_rate, "generate_tokens_per_s": generate_rate,
            "ratio": loop_rate / generate_rate, "goal": ">= 1.0"}


def reprefill_after_observations(model, processor, env, batch):
    """Bench-only variant of rollout.continue_after_observations: throw the cache away and prefill
    every row's whole context (prompt with images + response so far) again."""
    encoded = []
    for row in batch.rows:
        prompt = build_prompt(processor, env.registry, row.traj.sample)
        prompt["input_ids"] = torch.tensor([row.traj.prompt_ids + row.traj.response_ids])
        encoded.append(prompt)
    batch.cache, batch.attention, batch.deltas, batch.logits, positions = engine.prefill(model, encoded)
    for i, row in enumerate(batch.rows):
        row.positions = positions[0, i, batch.attention[i].bool()][len(row.traj.prompt_ids):].tolist()
        row.pending = []


def cache_reuse_vs_reprefill(size, device):
    s = setup(size, device)
    cfg = engine.RolloutConfig(group_size=GROUP, max_turns=3, max_turn_tokens=24, max_response_tokens=4096,
                               greedy=True)
    cached_s, cached = timed(lambda: seeded_rollout(s, cfg))
    original = engine.continue_after_observations
    engine.continue_after_observations = lambda model, batch, compact: reprefill_after_observations(
        model, s.processor, s.env, batch)
    try:
        reprefill_s, reprefilled = timed(lambda: seeded_rollout(s, cfg))
    finally:
        engine.continue_after_observations = original
    same = sum(a.response_ids == b.response_ids for a, b in zip(cached, reprefilled))
    return {"cached_s": cached_s, "reprefill_s": reprefill_s, "ratio": reprefill_s / cached_s,
            "turns": statistics.mean(t.num_turns for t in cached),
            "prompt_tokens": statistics.mean(len(t.prompt_ids) for t in cached),
            "identical_trajectories": f"{same}/{len(cached)}", "goal": ">= 2.0"}


def upstream_edit_refeed_vs_reprefill(size, device, turn_tokens=200, kept_tokens=40):
    """Upstream's turn loop rewrites each generated turn (maestro.upstream_edit), so the cache no
    longer matches the sequence. The engine masks the turn's cache columns and feeds only what was
    kept; the alternative is re-prefilling the whole context. Time of both, after a turn of
    `turn_tokens` tokens of which `kept_tokens` are kept, for 2 prompts x 8 rows of ~1500 prompt tokens."""
    s = setup(size, device)
    prompts = [build_prompt(s.processor, s.env.registry, sample) for sample in s.samples]
    generated = torch.randint(100, 200, (PROMPTS * GROUP, turn_tokens)).tolist()

    def after_turn():
        cache, attention, deltas, logits, _ = engine.prefill(s.model, prompts)
        cache.batch_repeat_interleave(GROUP)
        rows = [engine._Row(engine.Trajectory(sample, 0, [], [], [], [], None)) for sample in s.samples for _ in range(GROUP)]
        batch = engine._Batch(rows, cache, attention.repeat_interleave(GROUP, 0), deltas.repeat_interleave(GROUP, 0),
                              logits.repeat_interleave(GROUP, 0))
        start = batch.attention.shape[1]
        engine.feed(s.model, batch, generated)
        return batch, start

    refeed, reprefill = [], []
    with torch.no_grad():
        for _ in range(REPEATS + 1):
            batch, start = after_turn()
            began = time.perf_counter()
            batch.attention[:, start:] = 0
            engine.feed(s.model, batch, [g[-kept_tokens:] for g in generated])
            refeed.append(time.perf_counter() - began)
            encoded = []
            for prompt, g in zip([p for p in prompts for _ in range(GROUP)], generated):
                encoded.append({**prompt, "input_ids": torch.cat([prompt["input_ids"], torch.tensor([g[-kept_tokens:]])], 1)})
            began = time.perf_counter()
            engine.prefill(s.model, encoded)
            reprefill.append(time.perf_counter() - began)
    refeed_s, reprefill_s = statistics.median(refeed[1:]), statistics.median(reprefill[1:])
    return {"refeed_s": refeed_s, "reprefill_s": reprefill_s, "ratio": reprefill_s / refeed_s,
            "dead_cache_columns": turn_tokens, "goal": "report (> 1: masking + refeeding is the cheaper path)"}


def group_prefill_saving(size, device):
    s = setup(size, device)
    prompts = [build_prompt(s.processor, s.env.registry, sample) for sample in s.samples]

    def shared():
        with torch.no_grad():
            cache = engine.prefill(s.model, prompts)[0]
            cache.batch_repeat_interleave(GROUP)
    copies = [p for p in prompts for _ in range(GROUP)]

    def separate():
        with torch.no_grad():
            engine.prefill(s.model, copies)
    shared_s, _ = timed(shared)
    separate_s, _ = timed(separate)
    return {"shared_s": shared_s, "copies_s": separate_s, "ratio": separate_s / shared_s}


def loop_overhead(size, device):
    s = setup(size, device)
    cfg = engine.RolloutConfig(group_size=GROUP, max_turns=3, max_turn_tokens=32, max_response_tokens=4096)
    spent = {"forward": 0.0, "env": 0.0}

    def timing(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper
    s.model.forward = timing("forward", s.model.forward)
    s.env.step = timing("env", s.env.step)
    try:
        seeded_rollout(s, cfg)  # warm-up
        spent.update(forward=0.0, env=0.0)
        start = time.perf_counter()
        trajectories = seeded_rollout(s, cfg)
        wall = time.perf_counter() - start
    finally:
        del s.model.forward, s.env.step
    return {"wall_s": wall, "forward_s": spent["forward"], "env_s": spent["env"],
            "overhead_share": (wall - spent["forward"] - spent["env"]) / wall,
            "tokens": sum(len(t.response_ids) for t in trajectories), "goal": "<= 0.15"}


def expert_concurrency(size, device):
    """Size-independent: 16 search actions through Environment.step -> skill -> HTTP client."""
    delay, calls = 0.2, 16

    def respond(request):
        time.sleep(delay)
        return "The value is 7."
    with OpenAICompatServer(respond) as server:
        config = {**REGISTRY, "experts": [{**e, "base_url": server.url} for e in REGISTRY["experts"]]}
        registry = Registry.from_dict(config)
        s = setup("tiny", "cpu")
        env = Environment(registry, build_backends(registry), Services({}), s.processor.tokenizer, max_parallel=calls)
        actions = [Action("search", model="Bar-Reader", skill="Read_Bar", query=f"value {i}") for i in range(calls)]
        samples = [s.samples[i % len(s.samples)] for i in range(calls)]
        wall, results = timed(lambda: env.step(actions, samples))
    assert not any(r.error for r in results), [r.observation for r in results if r.error]
    return {"wall_s": wall, "ratio": wall / delay, "goal": "<= 1.5"}


# ----------------------------------------------------------------------------------------------
# Training sections: the toy policy on teacher-forced toy trajectories with 1-3 calls each

TRAIN_ROWS = 64


@functools.lru_cache(maxsize=None)
def training_setup(size, device):
    """(model, processor, TRAIN_ROWS trajectories of 1-3 random-pair calls, random advantages)."""
    import toyworld
    registry = Registry.load("configs/toy.json")
    model, processor = toyworld.build_toy_policy(registry, size=size, seed=0)
    env = Environment(registry, toyworld.toy_backends(registry), Services({}), processor.tokenizer)
    rng = random.Random(0)
    experts, skills = registry.advertised_experts(), registry.advertised_skills()
    trajectories = []
    for sample in toyworld.make_samples("train", TRAIN_ROWS, seed=0):
        calls = [format_call(rng.choice(experts).name, rng.choice(skills).name, sample.question)
                 for _ in range(rng.randint(1, 3))]
        trajectories.append(engine.trajectory_from_texts(processor, sample, env, calls + [format_answer(" 7 ")],
                                                         max_turns=3))
    advantages = torch.randn(TRAIN_ROWS, generator=torch.Generator().manual_seed(0))
    return model.to(device), processor, trajectories, advantages


def _update(size, device, **overrides):
    import train
    from parallel import Ranks
    model, processor, trajectories, advantages = training_setup(size, device)
    cfg = grpo.UpdateConfig.of(dict(train.read_config([]), drop_zero_adv=False, **overrides))  # the toy job's
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the loss, leave the weights alone
    return grpo.update_policy(model, optimizer, grpo.StepBatch(trajectories, advantages), cfg, Ranks(), processor)


def train_tokens_per_s(size, device):
    """Non-pad tokens per second through the GRPO loss forward + backward (update_policy, 1 epoch)."""
    seconds, metrics = timed(lambda: _update(size, device))
    return {"tokens_per_s": metrics["seq_tokens"] / seconds, "step_s": seconds, "tokens": metrics["seq_tokens"]}


@functools.lru_cache(maxsize=None)
def grpo_step_setup(size, device):
    """A GRPO step of the toy main job's shape: 32 prompts x 8 rows, each row a random-pair call and
    an answer (the shape the format warm-up teaches and the trained policy keeps), random advantages."""
    import toyworld
    from environment import demonstration_turns, make_environment
    world = toyworld.world(dict(registry="configs/toy.json", experts="toy", num_train=32, num_test=1, seed=0))
    model, processor = toyworld.build_toy_policy(world.registry, size=size, seed=0)
    env, rng = make_environment(world, processor.tokenizer), random.Random(0)
    trajectories = [engine.trajectory_from_texts(processor, sample, env,
                                                 *demonstration_turns(sample, env, rng, toyworld.request_of))
                    for sample in world.train for _ in range(8)]
    advantages = torch.randn(len(trajectories), generator=torch.Generator().manual_seed(0))
    return model.to(device), processor, trajectories, advantages


def train_forward_shared_vs_full(size, device):
    """Forward + backward of a toy-shaped GRPO step (256 rows) with each group's prompt computed
    once and its rows continued from its K/V, over the full forward of every row (time ratio)."""
    import train
    from parallel import Ranks
    model, processor, trajectories, advantages = grpo_step_setup(size, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the loss, leave the weights alone
    seconds, tokens = {}, {}
    for share in (False, True):
        cfg = grpo.UpdateConfig.of(dict(train.read_config([]), drop_zero_adv=False, share_prefix=share))
        step = grpo.StepBatch(trajectories, advantages)
        seconds[share], metrics = timed(lambda: grpo.update_policy(model, optimizer, step, cfg, Ranks(), processor))
        tokens[share] = metrics["seq_tokens"]
    return {"full_s": seconds[False], "shared_s": seconds[True], "ratio": seconds[False] / seconds[True],
            "full_tokens": tokens[False], "shared_tokens": tokens[True], "rows": len(trajectories), "goal": ">= 2.0"}


def rollout_compaction(size, device):
    """Rollout wall time of a toy-shaped batch (32 prompts x 8 rows, the toy environment, the main
    job's turn budgets) without compaction over with it (rows whose turn ended set aside from the
    decode steps), same seed; the policy first gets 100 warm-up steps on random-pair
    demonstrations so that its turns are ragged as in training. Also whether the two rollouts'
    trajectories are identical (they should be: compaction restores the row order)."""
    import toyworld
    import train
    from environment import make_environment
    from parallel import Ranks
    model, processor, demonstrations, _ = grpo_step_setup(size, device)
    cfg = grpo.UpdateConfig.of(train.read_config([]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(0)
    for _ in range(100):
        grpo.sft_step(model, optimizer, rng.sample(demonstrations, 64), processor, cfg, Ranks())
    world = toyworld.world(dict(registry="configs/toy.json", experts="toy", num_train=32, num_test=1, seed=1))
    env = make_environment(world, processor.tokenizer, obs_tokens=64)
    rollout_cfg = engine.RolloutConfig(group_size=8, max_turn_tokens=24, max_response_tokens=256)
    model.eval()

    def run(compact):
        torch.manual_seed(0)
        return engine.rollout(model, processor, world.train, env, replace(rollout_cfg, compact=compact))
    (plain_s, plain), (compact_s, compacted) = timed(lambda: run(False)), timed(lambda: run(True))
    return {"plain_s": plain_s, "compact_s": compact_s, "saving": 1 - compact_s / plain_s,
            "identical": all(a.response_ids == b.response_ids for a, b in zip(plain, compacted)),
            "goal": "report (the share of rollout time compaction saves)"}


def compiled_decode_vs_dynamic(size, device):
    """Greedy decode tokens per second of the static KV cache with its torch.compile'd one-token step
    (decode='compiled') against the dynamic cache, on the same prompts (the first, compiling run is
    the untimed warm-up), and whether the two paths gave the same tokens."""
    s = setup(size, device)
    cfg = engine.RolloutConfig(group_size=GROUP, max_turns=0, max_turn_tokens=64, greedy=True)
    rates, tokens = {}, {}
    for decode in ("dynamic", "static", "compiled"):
        seconds, trajectories = timed(lambda: seeded_rollout(s, replace(cfg, decode=decode)))
        tokens[decode] = [t.response_ids for t in trajectories]
        rates[decode] = sum(map(len, tokens[decode])) / seconds
    return {"dynamic_tokens_per_s": rates["dynamic"], "static_tokens_per_s": rates["static"],
            "compiled_tokens_per_s": rates["compiled"], "ratio": rates["compiled"] / rates["dynamic"],
            "tokens_equal": tokens["compiled"] == tokens["dynamic"] == tokens["static"],
            "goal": "report (CUDA graphs make it pay on a GPU; on a CPU the step is not launch-bound)"}


def padding_fraction(size, device):
    """Pad share of the length-sorted micro-batches (4096 padded tokens each) vs. arrival order."""
    _, _, trajectories, _ = training_setup(size, device)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]

    def pad_share(plan):
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
        return 1 - sum(lengths) / padded
    sorted_plan = grpo.plan_micro_batches(lengths, 4096)
    per = max(1, len(trajectories) // len(sorted_plan))
    arrival = [list(range(i, min(i + per, len(lengths)))) for i in range(0, len(lengths), per)]
    return {"sorted": pad_share(sorted_plan), "arrival_order": pad_share(arrival),
            "micro_batches": len(sorted_plan), "goal": "sorted <= 0.2"}


def _step_rss(size, device):
    _update(size, device)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a spawned child would report
    # its parent's peak; the high-water mark of /proc starts fresh with the new address space.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:  # no /proc (macOS): ru_maxrss, which may include the parent's peak
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(size, device):
    """Peak RSS of a fresh process that builds the policy and runs one training step."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return {"peak_rss_mb": pool.apply(_step_rss, (size, device))}


# ----------------------------------------------------------------------------------------------
# The GPU check (--gpu) and the memory table (--memory): not ratios, run on their own

def gpu_check(out_dir="out/gpu_check"):
    """What only a GPU can show, on a tiny policy: 2 GRPO steps under torchrun (one process with NCCL
    under DDP and under FSDP2, and two processes with FSDP2 when two GPUs exist), tests/dist_check.py
    on one or two GPUs, evaluations in bfloat16 under both turn loops, in bfloat16 the greedy hand loop
    vs model.generate (share of identical rows) and sampling-time vs training-time log-probs (max gap),
    and (float32) the compiled decode vs the dynamic cache. Skipped, returning None, without CUDA."""
    if not torch.cuda.is_available():
        print("gpu check: skipped (torch sees no CUDA device)")
        return None
    import toyworld
    from policy import save_policy
    registry = Registry.load("configs/toy.json")
    policy_dir = tempfile.mkdtemp(prefix="maestro_gpu_")
    save_policy(*toyworld.build_toy_policy(registry, "tiny", seed=0), policy_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    job = ["--model", policy_dir, "--device", "cuda", "--dtype", "bfloat16", "--sft_steps", "0", "--steps", "2",
           "--eval_every", "0", "--num_test", "16", "--goal", ""]
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def job_result(name, cmd):
        """Run one job; its whole output goes to out_dir/name.log (a torchrun failure's cause is at its head)."""
        began = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (Path(out_dir) / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            lines = done.stderr.splitlines()
            errors = [line for line in lines if "Error" in line] or lines[-10:]
            print(f"{name}: exit {done.returncode} (whole output: {out_dir}/{name}.log)", *errors[:20], sep="\n")
        return {"exit": done.returncode, "seconds": round(time.perf_counter() - began, 1),
                "future_warnings": done.stderr.count("FutureWarning")}

    results, gpus = {}, torch.cuda.device_count()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    for nproc, parallel in [(1, "ddp"), (1, "fsdp")] + ([(2, "fsdp")] if gpus >= 2 else []):
        results[f"torchrun_{nproc}gpu_{parallel}"] = job_result(f"train_{nproc}_{parallel}", [
            *torchrun, str(nproc), "train.py", *job, "--parallel", parallel, "--out", f"{out_dir}/train_{nproc}_{parallel}"])
    # the distributed checks of the test suite (tests/dist_check.py) on CUDA with NCCL, in bf16: updates
    # against one process's (relative difference), a sharded evaluation, the FSDP2 job with resume
    nproc = min(gpus, 2)
    results[f"dist_check_{nproc}gpu"] = job_result("dist_check", [
        *torchrun, str(nproc), "tests/dist_check.py", policy_dir, f"{out_dir}/dist_check"])
    report = Path(out_dir, "dist_check", "rank0.json")
    if report.exists():
        checked = json.loads(report.read_text())
        results["dist_check_update_vs_one_process"] = {
            name: checked[name]["max_abs_diff"] / max(checked[name]["max_abs_delta"], 1e-12)
            for name in ("ddp", "fsdp", "mixed_ddp", "mixed_fsdp") if name in checked}  # written part by part
        results["dist_check_sharded_eval_equals"] = "eval" in checked and checked["eval"]["sharded"] == checked["eval"]["alone"]
    for protocol in ("ours", "upstream"):
        results[f"eval_bf16_{protocol}"] = job_result(f"eval_{protocol}", [
            sys.executable, "eval.py", "--ckpt", policy_dir, "--device", "cuda", "--dtype", "bfloat16", "--num_test",
            "32", "--protocol", protocol, "--out", f"{out_dir}/eval_{protocol}"])

    s = setup("tiny", "cuda")
    s.model.to(torch.bfloat16)
    greedy = engine.RolloutConfig(group_size=GROUP, max_turns=0, max_turn_tokens=32, greedy=True)
    loop = seeded_rollout(s, greedy)
    texts = [s.processor.apply_chat_template(chat_messages(s.processor, s.env.registry, sample),
                                             add_generation_prompt=True, tokenize=False) for sample in s.samples]
    inputs = s.processor(text=texts, images=[sample.images[0] for sample in s.samples], padding=True,
                         return_tensors="pt").to("cuda")
    tokenizer = s.processor.tokenizer
    with torch.no_grad():
        out = s.model.generate(**inputs, do_sample=False, max_new_tokens=32, tokenizer=tokenizer,
                               stop_strings=list(maestro.STOP_STRINGS), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
                               suppress_tokens=suppressed_ids(s.processor))
    generated = [[t for t in row.tolist() if t != tokenizer.pad_token_id] for row in out[:, inputs["input_ids"].shape[1]:]]
    same = sum(loop[i * GROUP].response_ids == generated[i][:len(loop[i * GROUP].response_ids)] for i in range(len(generated)))
    results["bf16_greedy_rows_equal_generate"] = same / len(generated)
    sampled = seeded_rollout(s, engine.RolloutConfig(group_size=GROUP, max_turns=2, max_turn_tokens=32))
    batch = logprobs.collate(sampled, s.processor, device="cuda")
    with torch.no_grad():
        logp = logprobs.compute_logprobs(s.model, batch)["logprobs"]
    mask = batch["loss_mask"][:, 1:].bool()
    gap = torch.where(mask, (logp - batch["old_logprobs"][:, 1:]).abs(), 0.0)
    results["bf16_logprob_gap_max"] = float(gap.max())
    results["bf16_logprob_gap_mean"] = float(gap.sum() / mask.sum())
    results["compiled_decode_vs_dynamic"] = compiled_decode_vs_dynamic("tiny", "cuda")
    return results


QWEN3_VL_4B = {  # the released policy's architecture (shared/docs/qwen3vl-on-cpu-facts.md, section 1)
    "text_config": dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, intermediate_size=9728, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True}),
    "vision_config": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                          out_hidden_size=2560, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    "tie_word_embeddings": True,
}


def memory_table(gpus=(1, 4, 8)):
    """Per-GPU GiB of the paper setting (train.py's DEFAULTS; parallel.memory_estimate) for Qwen3-VL-4B
    on 1, 4 and 8 GPUs under DDP and FSDP2; the parameter count comes from the architecture built on
    the meta device."""
    import train
    from parallel import memory_estimate
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = Qwen3VLConfig(**QWEN3_VL_4B)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in Qwen3VLForConditionalGeneration(config).parameters())
    cfg = train.read_config(["--world", "data"])
    rows = []
    for parallel in ("ddp", "fsdp"):
        for n in gpus:
            plan = memory_estimate(num_params, config.get_text_config(), dict(cfg, parallel=parallel), n)
            rows.append({"parallel": parallel, "gpus": n, **{k: round(v, 1) for k, v in plan.items()}})
    print(f"Qwen3-VL-4B: {num_params / 1e9:.2f}B parameters; the paper setting; GiB per GPU")
    keys = [k for k in rows[0] if k not in ("parallel", "gpus")]
    print("| parallel | GPUs | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2))
    for row in rows:
        print(f"| {row['parallel']} | {row['gpus']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    return {"num_params": num_params, "rows": rows}


def time_to_goal(seeds=(0, 1), out_dir="out/time_to_goal"):
    """The main job (`python train.py --seed S`) end to end per seed, as a newcomer runs it: wall
    seconds (interpreter start included), the final sampled accuracy and format-valid rate, the
    baselines measured in the same run, and the goals (<= 360 s; >= best fixed pair + 0.20 and >=
    0.9 x oracle; format-valid >= 0.98)."""
    rows = []
    for seed in seeds:
        out = f"{out_dir}/seed{seed}"
        began = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "--seed", str(seed), "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        with open(f"{out}/results.json") as f:
            results = json.load(f)
        base = results["baselines"]
        rows.append({"seed": seed, "wall_s": round(wall, 1), "accuracy": results["accuracy"],
                     "format_valid": results["format_valid_rate"], "random_pair": base["random_pair"],
                     "best_fixed_pair": base["best_fixed_pair"], "oracle": base["oracle"],
                     "grpo_steps": results["train"]["grpo_steps"],
                     "goal_met": wall <= 360 and results["accuracy"] >= max(base["best_fixed_pair"] + 0.2,
                                                                             0.9 * base["oracle"])
                                 and results["format_valid_rate"] >= 0.98})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# Section name -> function(size, device) -> dict.
SECTIONS = {
    "rollout_vs_generate": rollout_vs_generate,
    "cache_reuse_vs_reprefill": cache_reuse_vs_reprefill,
    "group_prefill_saving": group_prefill_saving,
    "upstream_edit_refeed_vs_reprefill": upstream_edit_refeed_vs_reprefill,
    "loop_overhead": loop_overhead,
    "expert_concurrency": expert_concurrency,
    "train_tokens_per_s": train_tokens_per_s,
    "train_forward_shared_vs_full": train_forward_shared_vs_full,
    "rollout_compaction": rollout_compaction,
    "compiled_decode_vs_dynamic": compiled_decode_vs_dynamic,
    "padding_fraction": padding_fraction,
    "peak_rss_mb": peak_rss_mb,
}
SIZE_INDEPENDENT = {"expert_concurrency"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, default: all")
    parser.add_argument("--sizes", default="tiny,small", help="policy sizes, comma-separated")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU check instead (skipped without CUDA)")
    parser.add_argument("--memory", action="store_true", help="print the paper config's memory table instead")
    parser.add_argument("--time-to-goal", action="store_true", help="run the main job end to end for seeds 0 and 1")
    args = parser.parse_args(argv)
    if args.gpu or args.memory or args.time_to_goal:
        results = gpu_check() if args.gpu else memory_table() if args.memory else time_to_goal()
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    results = {"device": args.device, "threads": torch.get_num_threads()}
    for name in sections:
        sizes = ["-"] if name in SIZE_INDEPENDENT else args.sizes.split(",")
        for size in sizes:
            result = SECTIONS[name](size, args.device)
            results[f"{name}[{size}]"] = result
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            print(f"{name:26s} {size:5s} {shown}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
