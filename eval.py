"""Evaluate a policy checkpoint on the experts of a registry, and the baselines that need no training.

    python eval.py --ckpt runs/toy/final                       # toy registry, toy test split, in-process experts
    python eval.py --ckpt runs/toy/final --baselines --greedy
    python eval.py --ckpt Jinyang23/Maestro-4B --registry configs/paper.json \\
        --data data/val.parquet --n 8 --experts http --baselines

--ckpt is a local checkpoint directory or a Hugging Face Hub id (both load through
policy.load_policy / from_pretrained). Offline, a Hub id fails at once with a message naming it.
Without --data the toy test split is used (toy registry only). Several --data files (JSONL or verl
parquet) are read together and reported per data source.

Reported per data source and overall: accuracy (mean over the n samples of every question, upstream's
mean@n; 1 sample with --greedy; our strict scorer), accuracy_upstream (upstream's per-source scorers on
the whole decoded response, scoring.score_upstream) and the number of trajectories where the two
disagree, format-valid rate (scoring.compute_reward's format_ok), mean turns,
stop reasons, the routing table (calls per expert and skill, Level-2 paths, the share of the most
used first pair and the entropy of first pairs: a collapsed router has share 1 and entropy 0),
error observations by kind, latency per sample and per expert call, and policy / observation /
expert tokens. --baselines adds, through the same Environment, every fixed (expert, skill) pair
called with the question as input and its reply taken as the answer, a uniformly random pair (the
mean over pairs, i.e. its exact expectation on these samples), the best fixed pair, and oracle
routing (registry.oracle by Sample.family, else by data source).

The paper's experts are vLLM servers named and placed as configs/paper.json says (MODEL: the
checkpoint's local directory or Hub id; one GPU each, or share one with --gpu-memory-utilization):

    vllm serve MODEL --port 2368 --served-model-name Intern-S1-mini --trust-remote-code
    vllm serve MODEL --port 2376 --served-model-name GLM-4.6V-Flash
    vllm serve MODEL --port 2362 --served-model-name qwen3-VL-8B-Instruct
    vllm serve MODEL --port 2364 --served-model-name Chart-R1
    vllm serve MODEL --port 2369 --served-model-name medgemma-1.5-4b-it
    vllm serve MODEL --port 2370 --served-model-name DeepEyes-7B                     # zoom service
    vllm serve MODEL --port 2388 --served-model-name GLM-OCR                         # OCR service
    vllm serve MODEL --port 2389 --served-model-name PR1-Qwen2.5-VL-3B-Detection     # detection service

(the caption service reuses GLM-4.6V-Flash on 2376). The toy experts are one server for all four
names: `python toyworld.py serve --port 8765`, then `--experts http`.
"""

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

from data import load_samples
from experts import Services, build_backends
from maestro import Action, Environment, RolloutConfig, reply_of, response_text, rollout
from policy import load_policy, tokenizer_of
from registry import Registry, RegistryError
from scoring import RewardConfig, compute_reward, is_correct


TOY_REGISTRY = Path(__file__).resolve().parent / "configs" / "toy.json"


# ---------------------------------------------------------------------------------------------
# Policy evaluation

def _fraction(numerator, denominator):
    return numerator / denominator if denominator else 0.0


def routing_collapse(first_pairs: Counter, num_pairs: int) -> dict:
    """Collapse metrics of the first call's (expert, skill) pair: share of the most used pair and
    the pair entropy normalized by log(number of advertised pairs)."""
    total = sum(first_pairs.values())
    if not total:
        return {"max_pair_share": 0.0, "pair_entropy": 0.0, "top_pair": None}
    entropy = -sum(c / total * math.log(c / total) for c in first_pairs.values())
    top_pair, top = first_pairs.most_common(1)[0]
    return {"max_pair_share": top / total, "top_pair": top_pair,
            "pair_entropy": entropy / math.log(num_pairs) if num_pairs > 1 else 0.0}


def _summary(records: list, num_pairs: int) -> dict:
    """Accuracy, format and routing numbers of a list of per-trajectory records."""
    n = len(records)
    first_pairs = Counter(r["first_pair"] for r in records if r["first_pair"])
    return {"trajectories": n, "questions": len({r["id"] for r in records}),
            "accuracy": _fraction(sum(r["correct"] for r in records), n),
            "accuracy_upstream": _fraction(sum(r["correct_upstream"] for r in records), n),
            "scorers_disagree": sum(r["correct"] != r["correct_upstream"] for r in records),
            "format_valid_rate": _fraction(sum(r["format_ok"] for r in records), n),
            "mean_turns": _fraction(sum(r["turns"] for r in records), n),
            **routing_collapse(first_pairs, num_pairs)}


def _record(traj, reward_cfg, tokenizer) -> tuple:
    """(per-trajectory record, its expert Calls, the (expert, skill, path) of each resolved call).
    "correct" is our strict verdict, "correct_upstream" upstream's scorer on the decoded response."""
    sample = traj.sample
    texts = [turn.text for turn in traj.turns]
    actions = [turn.action for turn in traj.turns]
    errors = [turn.result.error if turn.result else "" for turn in traj.turns]
    _, info = compute_reward(texts, actions, errors, sample.ground_truths, sample.data_source,
                             replace(reward_cfg, scorer="strict"), response_text(traj, tokenizer))
    resolved = [(t.result.expert, t.result.skill, t.result.path) for t in traj.turns
                if t.result and t.result.expert and t.result.skill]
    calls = [call for t in traj.turns if t.result for call in t.result.calls]
    policy_tokens = sum(traj.loss_mask)
    record = {"id": sample.id, "source": sample.data_source, "correct": info["correct_strict"],
              "correct_upstream": info["correct_upstream"],
              "format_ok": info["format_ok"], "turns": traj.num_turns, "stop_reason": traj.stop_reason,
              "errors": [e for e in errors if e], "answer": info["answer"],
              "first_pair": "@@".join(resolved[0][:2]) if resolved else None,
              "prompt_tokens": len(traj.prompt_ids), "policy_tokens": policy_tokens,
              "observation_tokens": len(traj.response_ids) - policy_tokens}
    return record, calls, resolved


def shard(items, world):
    """This rank's contiguous share of `items`; concatenating the shards in rank order gives `items`."""
    if world is None or world.size == 1:
        return list(items)
    per, extra = divmod(len(items), world.size)
    lo = world.rank * per + min(world.rank, extra)
    return list(items[lo:lo + per + (world.rank < extra)])


def gathered(values, world):
    """The concatenation over ranks (in rank order) of each rank's list `values`, on every rank."""
    return list(values) if world is None or world.size == 1 else [v for part in world.gather(values) for v in part]


def evaluate(model, processor, samples, env, cfg, n=1, baselines=False, registry=None, reward_cfg=None,
             batch_size=32, world=None) -> dict:
    """Roll the policy out on `samples` (n trajectories each; 1 when cfg.greedy) with rollout
    settings `cfg` and return the results dict (see the module docstring; JSON-serializable).

    world (train.World, or None for one process): every rank rolls out its shard of the samples
    (its own full copy of the model: FSDP2 callers unshard first) and the per-trajectory records
    are gathered, so the results are the same on every rank and no rank waits idle for a whole
    evaluation (NCCL's watchdog would abort a long one)."""
    registry = registry or env.registry
    reward_cfg = reward_cfg or RewardConfig()
    cfg = replace(cfg, group_size=1 if cfg.greedy else n)
    mine, items, began = shard(samples, world), [], time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            items += [_record(traj, reward_cfg, env.tokenizer)
                      for traj in rollout(model, processor, mine[start:start + batch_size], env, cfg)]
    seconds = time.perf_counter() - began
    if world is not None and world.size > 1:
        seconds = world.max(seconds)  # wall time: the slowest shard
    results = summarize_records(gathered(items, world), registry, seconds)
    results.update(n=cfg.group_size, greedy=cfg.greedy,
                   config={"registry": registry.source, "rollout": asdict(cfg), "reward": asdict(reward_cfg),
                           "samples": len(samples)})
    if baselines:
        results["baselines"] = run_baselines(samples, env, registry, world)
    return results


def summarize(trajectories, registry, tokenizer, reward_cfg=None, seconds=0.0) -> dict:
    """The results of finished trajectories (sampled, or teacher-forced by trajectory_from_texts);
    `seconds` is the rollout wall time they took."""
    reward_cfg = reward_cfg or RewardConfig()
    return summarize_records([_record(traj, reward_cfg, tokenizer) for traj in trajectories], registry, seconds)


def summarize_records(items, registry, seconds=0.0) -> dict:
    """The results of per-trajectory (record, calls, resolved) triples (_record)."""
    num_pairs = len(registry.advertised_experts()) * len(registry.advertised_skills())
    records = [record for record, _, _ in items]
    calls = [call for _, traj_calls, _ in items for call in traj_calls]
    routes = [route for _, _, resolved in items for route in resolved]
    by_source = defaultdict(list)
    for record in records:
        by_source[record["source"]].append(record)
    table = defaultdict(Counter)
    for expert, skill, _ in routes:
        table[expert][skill] += 1
    expert_calls = [c for c in calls if c.kind == "expert"]
    latency_by_expert = defaultdict(list)
    for call in expert_calls:
        latency_by_expert[call.name].append(call.latency)
    num_questions = len({r["id"] for r in records})
    mean = lambda key: _fraction(sum(r[key] for r in records), len(records))  # noqa: E731
    return {
        **_summary(records, num_pairs),
        "by_source": {source: _summary(rs, num_pairs) for source, rs in sorted(by_source.items())},
        "calls": {expert: dict(skills) for expert, skills in sorted(table.items())},
        "skill_paths": dict(Counter(" > ".join(path) for _, _, path in routes)),
        "errors": dict(Counter(e for r in records for e in r["errors"])),
        "expert_errors": dict(Counter(c.error for c in calls if c.error)),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in records)),
        "latency": {"per_sample_s": _fraction(seconds, num_questions), "total_s": seconds,
                    "per_expert_call_s": {name: sum(v) / len(v) for name, v in sorted(latency_by_expert.items())}},
        "tokens": {"prompt_mean": mean("prompt_tokens"), "policy_mean": mean("policy_tokens"),
                   "observation_mean": mean("observation_tokens"),
                   "expert_prompt": sum(c.prompt_tokens for c in expert_calls),
                   "expert_completion": sum(c.completion_tokens for c in expert_calls),
                   "service_calls": len(calls) - len(expert_calls)},
    }


# ---------------------------------------------------------------------------------------------
# Baselines: no policy, the question goes straight to a pair and its reply is the answer

def _reply_correct(result, sample) -> bool:
    return not result.error and is_correct(reply_of(result.observation), sample.ground_truths, sample.data_source)


def _pair_scores(samples, env, expert: str, skill: str) -> list:
    actions = [Action(kind="search", model=expert, skill=skill, query=s.question) for s in samples]
    return [_reply_correct(result, s) for result, s in zip(env.step(actions, samples), samples)]


def run_baselines(samples, env, registry, world=None) -> dict:
    """Every advertised fixed pair, a uniformly random pair (expectation), the best fixed pair and
    oracle routing, overall and per data source. Oracle is None where no sample has an oracle pair.
    With a world, each rank scores its shard of the samples and the scores are gathered."""
    sources = sorted({s.data_source for s in samples})
    mine = shard(samples, world)
    scores = {(e.name, s.name): gathered(_pair_scores(mine, env, e.name, s.name), world)
              for e in registry.advertised_experts() for s in registry.advertised_skills()}
    oracle_pairs = [registry.oracle.get(s.family) or registry.oracle.get(s.data_source) for s in mine]
    mine_oracle = [None] * len(mine)
    for pair in sorted(set(filter(None, oracle_pairs))):
        picked = [i for i, p in enumerate(oracle_pairs) if p == pair]
        for i, correct in zip(picked, _pair_scores([mine[i] for i in picked], env, *pair)):
            mine_oracle[i] = correct
    oracle_scores = gathered(mine_oracle, world)

    def summarize(indices):
        pairs = {pair: _fraction(sum(s[i] for i in indices), len(indices)) for pair, s in scores.items()}
        best = max(pairs, key=pairs.get)
        oracle = [oracle_scores[i] for i in indices if oracle_scores[i] is not None]
        return {"random_pair": _fraction(sum(pairs.values()), len(pairs)), "best_fixed_pair": pairs[best],
                "best_pair": list(best), "oracle": _fraction(sum(oracle), len(oracle)) if oracle else None,
                "oracle_coverage": _fraction(len(oracle), len(indices)), "pairs": pairs}

    overall = summarize(range(len(samples)))
    result = {key: value for key, value in overall.items() if key != "pairs"}
    result["pairs"] = defaultdict(dict)
    for (expert, skill), accuracy in overall["pairs"].items():
        result["pairs"][expert][skill] = accuracy
    result["pairs"] = dict(result["pairs"])
    result["by_source"] = {}
    for source in sources:
        summary = summarize([i for i, s in enumerate(samples) if s.data_source == source])
        result["by_source"][source] = {k: v for k, v in summary.items() if k != "pairs"}
    return result


# ---------------------------------------------------------------------------------------------
# Output

def _cell(value):
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict) -> str:
    base = results.get("baselines")
    header = ["source", "questions", "accuracy", "accuracy (upstream's scorer)", "scorers disagree", "format valid",
              "turns", "top pair share"]
    if base:
        header += ["random pair", "best fixed pair", "oracle"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [*results["by_source"].items(), ("**overall**", results)]
    for source, r in rows:
        cells = [source, r["questions"], r["accuracy"], r["accuracy_upstream"], r["scorers_disagree"],
                 r["format_valid_rate"], r["mean_turns"], r["max_pair_share"]]
        if base:
            b = base if source == "**overall**" else base["by_source"].get(source, {})
            cells += [b.get("random_pair"), b.get("best_fixed_pair"), b.get("oracle")]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    skills = sorted({skill for row in results["calls"].values() for skill in row})
    if skills:
        lines += ["", "Calls (expert x skill):", "", "| expert | " + " | ".join(skills) + " |",
                  "|" + "---|" * (len(skills) + 1)]
        lines += [f"| {e} | " + " | ".join(str(row.get(s, 0)) for s in skills) + " |"
                  for e, row in results["calls"].items()]
    if results["skill_paths"]:
        lines += ["", "Skill paths: " + ", ".join(f"{p}: {c}" for p, c in sorted(results["skill_paths"].items()))]
    lines += ["", f"Errors: {results['errors'] or 'none'}; expert errors: {results['expert_errors'] or 'none'}; "
                  f"stop reasons: {results['stop_reasons']}",
              f"Latency: {results['latency']['per_sample_s']:.3f} s per question; per expert call: "
              + (", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results["latency"]["per_expert_call_s"].items())
                 or "none"),
              "Tokens per trajectory: prompt {prompt_mean:.1f}, policy {policy_mean:.1f}, observations "
              "{observation_mean:.1f}; expert tokens in {expert_prompt}, out {expert_completion}".format(**results["tokens"])]
    if base:
        lines.append(f"Best fixed pair: {'@@'.join(base['best_pair'])}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir) -> None:
    """results.json + results.md in out_dir; prints the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = results_markdown(results)
    (out / "results.md").write_text(markdown)
    print(markdown, end="")


# ---------------------------------------------------------------------------------------------
# Command line

def _uses_only_toy_skills(registry) -> bool:
    return all(s.implementation.split(":")[0] in ("toy", "router") for s in registry.skills.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a MAESTRO policy checkpoint (see the module docstring).")
    parser.add_argument("--ckpt", required=True, help="local checkpoint directory or Hugging Face Hub id")
    parser.add_argument("--registry", default=str(TOY_REGISTRY), help="registry JSON (default: the toy world)")
    parser.add_argument("--data", nargs="+", help="JSONL or verl parquet files (default: the toy test split)")
    parser.add_argument("--prompt", choices=("stored", "registry"), default="stored",
                        help="stored: a data row's own prompt when it has one (what a checkpoint was trained "
                             "with), else the registry's; registry: always the registry's (registry swaps)")
    parser.add_argument("--test-n", type=int, default=256, help="toy test questions when --data is omitted")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions")
    parser.add_argument("--n", type=int, default=1, help="sampled trajectories per question (mean@n)")
    parser.add_argument("--greedy", action="store_true", help="one greedy trajectory per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-turns", type=int, default=0, help="expert calls per trajectory "
                                                                 "(default: the registry's prompt max_calls)")
    parser.add_argument("--protocol", choices=("ours", "upstream"), default="ours",
                        help="the turn loop: ours, or upstream's (what the released checkpoint was trained with: "
                             "no stop strings, first-turn reasoning cut to its last 200 tokens, later turns cut "
                             "to their action block, bare observation turns with the reply's last 1000 characters)")
    parser.add_argument("--max-turn-tokens", type=int, default=None,
                        help="sampled tokens per turn (default 4096; 8192 with --protocol upstream, as upstream)")
    parser.add_argument("--max-response-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per rollout batch")
    parser.add_argument("--baselines", action="store_true", help="also run the pair / random / oracle baselines")
    parser.add_argument("--experts", choices=("inprocess", "http"), default=None,
                        help="inprocess: toy experts in this process; http: the registry's base_urls "
                             "(default: inprocess for a registry of toy skills, else http)")
    parser.add_argument("--out", default="out/eval", help="directory for results.json and results.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the policy runs (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="policy weights' dtype (default: bfloat16 on CUDA, float32 on CPU); "
                             "log-softmax is float32 either way")
    args = parser.parse_args(argv)


    try:
        registry = Registry.load(args.registry)
    except RegistryError as error:
        sys.exit(f"eval: {error}")
    toy = _uses_only_toy_skills(registry)
    if args.data is None and not toy:
        sys.exit(f"eval: --data is required with {args.registry} (the toy test split only fits the toy registry)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"eval: --device {args.device}: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        model, processor = load_policy(args.ckpt, dtype=dtype, device=device)
    except OSError as error:
        sys.exit(f"eval: {error}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.data:
        samples = load_samples(args.data, use_stored_prompt=args.prompt == "stored")
    else:
        import toyworld
        samples = toyworld.make_samples("test", args.test_n, seed=0)
    samples = samples[:args.limit] if args.limit > 0 else samples

    mode = args.experts or ("inprocess" if toy else "http")
    if mode == "inprocess":
        if not toy:
            sys.exit("eval: --experts inprocess runs the toy experts; this registry has non-toy skills, use --experts http")
        import toyworld
        backends = toyworld.toy_backends(registry)
    else:
        backends = build_backends(registry)
    env = Environment(registry, backends, Services(registry.services), tokenizer_of(processor), protocol=args.protocol)
    max_turn_tokens = args.max_turn_tokens or (8192 if args.protocol == "upstream" else 4096)
    cfg = RolloutConfig(group_size=args.n, max_turns=args.max_turns or registry.prompt_options["max_calls"],
                        max_turn_tokens=max_turn_tokens, max_response_tokens=args.max_response_tokens,
                        temperature=args.temperature, greedy=args.greedy, protocol=args.protocol)
    results = evaluate(model, processor, samples, env, cfg, n=args.n, baselines=args.baselines,
                       registry=registry, batch_size=args.batch_size)
    results["checkpoint"] = args.ckpt
    results["config"].update(data=args.data or f"toy test split ({args.test_n})", experts=mode, seed=args.seed, prompt=args.prompt, protocol=args.protocol,
                             device=str(device), dtype=str(dtype).removeprefix("torch."))
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
