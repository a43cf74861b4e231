"""Evaluate a policy checkpoint on the experts of a registry, and the baselines that need no training.

    python eval.py --ckpt out/toy/final                             # the toy world: toy test split, in-process experts
    python eval.py --ckpt out/toy/final --baselines true --greedy true
    python eval.py --ckpt out/toy_registry/final --registry configs/toy_unseen.json --baselines true
                                                                    # a registry of cards it never saw
    python eval.py --ckpt Jinyang23/Maestro-4B --world data --test_data data/val.parquet \\
        --n 8 --baselines true --protocol upstream          # configs/paper.json, experts over HTTP

Flags are train.py's: --key value (or --key=value), --config FILE, unknown keys are errors
(config.py). The defaults are the paper's evaluation (configs/paper.json, experts over HTTP);
--world toy, the default world, applies configs/eval_toy.json (the toy job's own evaluation settings). The world (--world toy | data, data.load_world) gives the registry, its experts and
the test samples, exactly as it does for train.py. --ckpt is a local checkpoint directory or a
Hugging Face Hub id (both load through policy.load_policy); offline, a Hub id fails at once with a
message naming it. Several --test_data files (comma-separated; JSONL or verl parquet) are read
together and reported per data source.

Reported per data source and overall: accuracy (mean over the n samples of every question, upstream's
mean@n; 1 sample with --greedy; our strict scorer), accuracy_upstream (upstream's per-source scorers on
the whole decoded response, scoring.score_upstream) and the number of trajectories where the two
disagree, format-valid rate (scoring.compute_reward's format_ok), mean turns and reward,
stop reasons, routing accuracy (the share of first calls that went to the sample's oracle pair,
the pair its family's cards fit), the routing table (calls per expert and skill, Level-2 paths,
the share of the most used first pair and the entropy of first pairs: a collapsed router has
share 1 and entropy 0; a sample with its own renamed view is counted under the names of the
registry the view was drawn from),
error observations by kind, latency per sample and per expert call, and policy / observation /
expert tokens. --baselines adds, through the same Environment, every fixed (expert, skill) pair
called with the question as input and what its reply answers taken as the answer
(maestro.answer_in_reply: the last line, or the inside of an answer block), a uniformly
random pair (the mean over pairs, i.e. its exact expectation on these samples), the best fixed pair, and oracle
routing (registry.oracle by Sample.family, else by data source). With matplotlib installed (the
`plot` extra) the routing table is also drawn as routing.png in --out (default out/eval).

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

(the caption service reuses GLM-4.6V-Flash on 2376; the two unadvertised entries, Qwen3.5-9B on 2381
and Step3-VL-10B on 2382, need servers only if a policy calls them by name). The toy experts are one server for all four
names: `python toyworld.py serve --port 8765`, then `--experts http`.
"""

import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

import plots
from config import parse_config, show_help
from data import load_world
from environment import make_environment
from maestro import Action, answer_in_reply, pair_name, reply_of
from parallel import Ranks, autocast, full_params
from policy import load_policy, tokenizer_of
from rollout import DECODE_MODES, RolloutConfig, rollout
from scoring import RewardConfig, compute_reward, is_correct

DEFAULTS = dict(
    ckpt="",                   # a checkpoint directory or a Hub id (required)
    out="out/eval",            # results.json, results.md (and routing.png) go here
    seed=0,
    threads=0,                 # torch CPU threads (0: leave torch's default)
    # the world, as train.py names it; --world toy (the default) applies configs/eval_toy.json: the toy
    # job's evaluation settings (train.py's final evaluation), so its numbers can be reproduced
    world="toy",               # toy | data (data.load_world)
    registry="configs/paper.json",
    test_data="",              # comma-separated JSONL / parquet files; the toy world generates its split when ""
    num_test=0,                # the first N test samples; 0: all (the toy world then generates 256)
    experts="http",            # http: the registry's URLs (or expert_url) | toy: in-process toy experts (toy world)
    expert_url="",
    prompt="stored",           # stored: a row's own prompt when it has one; registry: always the registry's
    # the rollout
    n=1,                       # sampled trajectories per question (mean@n)
    greedy=False,              # one greedy trajectory per question
    temperature=1.0,
    protocol="ours",           # ours | upstream (the released checkpoint's turn loop: maestro.upstream_edit)
    max_turns=0,               # expert calls per trajectory; 0: the registry prompt's max_calls
    max_turn_tokens=0,         # sampled tokens per turn; 0: 4096 (8192 with protocol upstream, as upstream)
    max_response_tokens=8192,
    obs_tokens=1024,           # token budget of one observation (head and tail kept around a marker)
    decode="dynamic",          # KV cache of the rollout: dynamic | static | compiled (static + torch.compile, CUDA graphs)
    batch_size=32,             # questions per rollout batch
    baselines=False,           # also run the fixed pair / random pair / oracle baselines
    device="auto",             # auto (cuda when available, else cpu) | cuda | cpu
    dtype="auto",              # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    dist_timeout_s=3600,       # under torchrun: how long a rank done with its shard waits for the slowest one
)
CHOICES = {"world": ("toy", "data"), "experts": ("toy", "http"), "prompt": ("stored", "registry"),
           "protocol": ("ours", "upstream"), "decode": DECODE_MODES, "device": ("auto", "cuda", "cpu"),
           "dtype": ("auto", "bfloat16", "float32")}
PRESETS = {"world": {"toy": str(Path(__file__).resolve().parent / "configs" / "eval_toy.json")}}


# ---------------------------------------------------------------------------------------------
# One record per trajectory, one summary of many: evaluation and training metrics both use these

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


UPSTREAM_RESPONSE_TOKENS = 4096  # upstream's response_length: the episode is cut to it before scoring


def response_text(traj, tokenizer):
    """The response's first UPSTREAM_RESPONSE_TOKENS tokens as one string, sampled turns and
    observations in order, special tokens dropped: what upstream's reward manager scored
    (scoring.score_upstream); an answer written after that cut scores 0 there, and here."""
    return tokenizer.decode(traj.response_ids[:UPSTREAM_RESPONSE_TOKENS], skip_special_tokens=True)


def record(traj, reward_cfg, env) -> dict:
    """The picklable facts about one finished trajectory (sampled, or teacher-forced by
    rollout.trajectory_from_texts) that results and training metrics need: its reward under
    reward_cfg and the verdict that reward used ("correct"), our strict verdict and upstream's
    scorer on the decoded response, format, turns, stop, error kinds, the resolved calls
    ("routes": (expert, skill, Level-2 path), under the names of the environment's registry when
    the sample had a renamed view), whether the first call went to the sample's oracle pair
    ("routed_right": None without a call or an oracle pair), the expert Calls made, tokens."""
    sample, registry = traj.sample, env.registry_of(traj.sample)
    errors = [turn.result.error if turn.result else "" for turn in traj.turns]
    reward, info = compute_reward([turn.text for turn in traj.turns], [turn.action for turn in traj.turns], errors,
                                  sample.ground_truths, sample.data_source, reward_cfg, response_text(traj, env.tokenizer))
    called = [t.result for t in traj.turns if t.result and t.result.expert and t.result.skill]
    oracle = registry.oracle.get(sample.family) or registry.oracle.get(sample.data_source)
    routed_right = (called[0].expert, called[0].skill) == oracle if called and oracle else None
    routes = [(r.expert, r.skill, r.path) for r in called]
    if sample.registry:  # a renamed view: counted under the names of the registry it was drawn from
        experts, skills = registry.expert_origin, registry.skill_origin
        routes = [(experts[e], skills[k], tuple(skills.get(name, name) for name in path)) for e, k, path in routes]
    policy_tokens = sum(traj.loss_mask)
    return {"id": sample.id, "source": sample.data_source, "reward": reward, "correct": info["correct"],
            "correct_strict": info["correct_strict"], "correct_upstream": info["correct_upstream"],
            "format_ok": info["format_ok"], "turns": traj.num_turns, "stop_reason": traj.stop_reason,
            "errors": [e for e in errors if e], "answer": info["answer"], "routes": routes,
            "first_pair": pair_name(*routes[0][:2]) if routes else None, "routed_right": routed_right,
            "calls": [call for t in traj.turns if t.result for call in t.result.calls],
            "prompt_tokens": len(traj.prompt_ids), "policy_tokens": policy_tokens,
            "observation_tokens": len(traj.response_ids) - policy_tokens}


def _summary(records: list, num_pairs: int) -> dict:
    """Accuracy, reward, format and routing numbers of a list of records."""
    n = len(records)
    mean = lambda key: _fraction(sum(r[key] for r in records), n)  # noqa: E731
    first_pairs = Counter(r["first_pair"] for r in records if r["first_pair"])
    routed = [r["routed_right"] for r in records if r["routed_right"] is not None]
    return {"trajectories": n, "questions": len({r["id"] for r in records}),
            "accuracy": mean("correct"), "routing_accuracy": _fraction(sum(routed), len(routed)),
            "accuracy_upstream": _fraction(sum(r["correct_upstream"] or 0 for r in records), n),
            "scorers_disagree": sum(r["correct_strict"] != r["correct_upstream"] for r in records),
            "format_valid_rate": mean("format_ok"), "mean_turns": mean("turns"), "mean_reward": mean("reward"),
            **routing_collapse(first_pairs, num_pairs)}


def summarize(records, registry, seconds=0.0) -> dict:
    """The results of per-trajectory records (`record`); `seconds` is the rollout wall time."""
    num_pairs = len(registry.advertised_experts()) * len(registry.advertised_skills())
    calls = [call for r in records for call in r["calls"]]
    routes = [route for r in records for route in r["routes"]]
    by_source = defaultdict(list)
    for r in records:
        by_source[r["source"]].append(r)
    table = defaultdict(Counter)
    for expert, skill, _ in routes:
        table[expert][skill] += 1
    expert_calls = [c for c in calls if c.kind == "expert"]
    latency_by_expert = defaultdict(list)
    for call in expert_calls:
        latency_by_expert[call.name].append(call.latency)
    mean = lambda key: _fraction(sum(r[key] for r in records), len(records))  # noqa: E731
    return {
        **_summary(records, num_pairs),
        "by_source": {source: _summary(rs, num_pairs) for source, rs in sorted(by_source.items())},
        "calls": {expert: dict(skills) for expert, skills in sorted(table.items())},
        "skill_paths": dict(Counter(" > ".join(path) for _, _, path in routes)),
        "errors": dict(Counter(e for r in records for e in r["errors"])),
        "expert_errors": dict(Counter(c.error for c in calls if c.error)),
        "truncated_replies": sum(c.truncated for c in calls),  # cut at an expert's or service's max_tokens
        "stop_reasons": dict(Counter(r["stop_reason"] for r in records)),
        "latency": {"per_sample_s": _fraction(seconds, len({r["id"] for r in records})), "total_s": seconds,
                    "per_expert_call_s": {name: sum(v) / len(v) for name, v in sorted(latency_by_expert.items())}},
        "tokens": {"prompt_mean": mean("prompt_tokens"), "policy_mean": mean("policy_tokens"),
                   "observation_mean": mean("observation_tokens"),
                   "expert_prompt": sum(c.prompt_tokens for c in expert_calls),
                   "expert_completion": sum(c.completion_tokens for c in expert_calls),
                   "service_calls": len(calls) - len(expert_calls)},
    }


# ---------------------------------------------------------------------------------------------
# Policy evaluation

def flat_results(results):
    """eval.summarize's results as flat metrics: the overall numbers, calls per expert and skill,
    errors (observations and expert calls) and stop reasons by kind, token means, and route/<data source>/<routing number>."""
    m = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for expert, skills in results["calls"].items():
        m[f"calls/expert/{expert}"] = sum(skills.values())
        for skill, count in skills.items():
            m[f"calls/skill/{skill}"] = m.get(f"calls/skill/{skill}", 0) + count
    m.update({f"errors/{k}": v for k, v in results["errors"].items()})
    m.update({f"expert_errors/{k}": v for k, v in results["expert_errors"].items()})
    m.update({f"stop/{k}": v for k, v in results["stop_reasons"].items()})
    m.update({f"tokens/{k}": v for k, v in results["tokens"].items()})
    for source, r in results["by_source"].items():
        m.update({f"route/{source}/{k}": r[k] for k in ("max_pair_share", "top_pair", "pair_entropy", "routing_accuracy")})
    return m


def evaluate(model, processor, samples, env, cfg, n=1, baselines=False, registry=None, reward_cfg=None,
             batch_size=32, ranks=None) -> dict:
    """Roll the policy out on `samples` (n trajectories each; 1 when cfg.greedy) with rollout
    settings `cfg` and return the results dict (see the module docstring; JSON-serializable).

    ranks (parallel.Ranks under torchrun; None: this process alone): every rank rolls out its
    shard of the samples (its own full copy of the model: FSDP2 callers unshard first) and the
    records are gathered, so the results are the same on every rank and no rank waits idle for a
    whole evaluation (NCCL's watchdog would abort a long one). Records use our strict scorer
    (accuracy); upstream's is reported beside it (accuracy_upstream)."""
    registry, ranks = registry or env.registry, ranks or Ranks("cpu", "float32", alone=True)
    reward_cfg = replace(reward_cfg or RewardConfig(), scorer="strict")
    cfg = replace(cfg, group_size=1 if cfg.greedy else n)
    mine, records, began = ranks.shard(samples), [], time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            records += [record(traj, reward_cfg, env)
                        for traj in rollout(model, processor, mine[start:start + batch_size], env, cfg)]
    seconds = ranks.max(time.perf_counter() - began)  # wall time: the slowest shard
    results = summarize(ranks.concat(records), registry, seconds)
    results.update(n=cfg.group_size, greedy=cfg.greedy,
                   config={"registry": registry.source, "rollout": asdict(cfg), "reward": asdict(reward_cfg),
                           "samples": len(samples)})
    if baselines:
        results["baselines"] = run_baselines(samples, env, registry, ranks)
    return results


# ---------------------------------------------------------------------------------------------
# Baselines: no policy, the question goes straight to a pair and what its reply answers is the answer

def evaluate_sharded(model, processor, samples, env, rollout_cfg, ranks, **kwargs):
    """eval.evaluate with every rank rolling out its shard of the samples (FSDP2: all ranks hold
    full parameters meanwhile); the same results on every rank."""
    model.eval()
    with torch.no_grad(), full_params(model) as sampler, autocast(ranks):
        return evaluate(sampler, processor, samples, env, rollout_cfg, n=1, ranks=ranks, **kwargs)


def _reply_correct(result, sample) -> bool:
    answer = answer_in_reply(reply_of(result.observation))
    return not result.error and is_correct(answer, sample.ground_truths, sample.data_source)


def _pair_scores(samples, env, expert: str, skill: str) -> list:
    actions = [Action(kind="search", model=expert, skill=skill, query=s.question) for s in samples]
    return [_reply_correct(result, s) for result, s in zip(env.step(actions, samples), samples)]


def run_baselines(samples, env, registry, ranks=None) -> dict:
    """Every advertised fixed pair, a uniformly random pair (expectation), the best fixed pair and
    oracle routing, overall and per data source. Oracle is None where no sample has an oracle pair.
    Each rank scores its shard of the samples and the scores are gathered."""
    sources, ranks = sorted({s.data_source for s in samples}), ranks or Ranks("cpu", "float32", alone=True)
    # a renamed view is the same world (competence follows the cards): the baselines are `registry`'s
    mine = [replace(s, registry=None) for s in ranks.shard(samples)]
    scores = {(e.name, s.name): ranks.concat(_pair_scores(mine, env, e.name, s.name))
              for e in registry.advertised_experts() for s in registry.advertised_skills()}
    oracle_pairs = [registry.oracle.get(s.family) or registry.oracle.get(s.data_source) for s in mine]
    mine_oracle = [None] * len(mine)
    for pair in sorted(set(filter(None, oracle_pairs))):
        picked = [i for i, p in enumerate(oracle_pairs) if p == pair]
        for i, correct in zip(picked, _pair_scores([mine[i] for i in picked], env, *pair)):
            mine_oracle[i] = correct
    oracle_scores = ranks.concat(mine_oracle)

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
                  f"replies cut at max_tokens: {results['truncated_replies']}; stop reasons: {results['stop_reasons']}",
              f"Latency: {results['latency']['per_sample_s']:.3f} s per question; per expert call: "
              + (", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results["latency"]["per_expert_call_s"].items())
                 or "none"),
              "Tokens per trajectory: prompt {prompt_mean:.1f}, policy {policy_mean:.1f}, observations "
              "{observation_mean:.1f}; expert tokens in {expert_prompt}, out {expert_completion}".format(**results["tokens"])]
    if base:
        lines.append(f"Best fixed pair: {pair_name(*base['best_pair'])}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir) -> None:
    """results.json + results.md in out_dir, and routing.png when matplotlib is installed; prints
    the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = results_markdown(results)
    (out / "results.md").write_text(markdown)
    plots.routing_heatmap(results, out / "routing.png")
    print(markdown, end="")


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, DEFAULTS):
        return None
    try:
        cfg = parse_config(argv, DEFAULTS, CHOICES, PRESETS)
        if not cfg["ckpt"]:
            raise ValueError("--ckpt is required: a checkpoint directory or a Hugging Face Hub id")
        ranks = Ranks(cfg["device"], cfg["dtype"], cfg["dist_timeout_s"])  # under torchrun, every rank evaluates a shard
        world = load_world(cfg)
        model, processor = load_policy(cfg["ckpt"], dtype=ranks.dtype, device=ranks.device)
    except (ValueError, OSError) as error:  # a bad flag, config, registry, data file or checkpoint
        sys.exit(f"eval.py: {error}")
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    env = make_environment(world, tokenizer_of(processor), cfg["protocol"], cfg["obs_tokens"])
    rollout_cfg = RolloutConfig(group_size=cfg["n"], max_turns=cfg["max_turns"] or None,
                                max_turn_tokens=cfg["max_turn_tokens"] or (8192 if cfg["protocol"] == "upstream" else 4096),
                                max_response_tokens=cfg["max_response_tokens"], temperature=cfg["temperature"],
                                greedy=cfg["greedy"], protocol=cfg["protocol"], decode=cfg["decode"])
    results = evaluate(model, processor, world.test, env, rollout_cfg, n=cfg["n"], baselines=cfg["baselines"],
                       batch_size=cfg["batch_size"], ranks=ranks)
    results["checkpoint"] = cfg["ckpt"]
    results["config"].update({k: cfg[k] for k in ("world", "test_data", "experts", "seed", "prompt", "protocol")},
                             device=str(ranks.device), dtype=str(ranks.dtype).removeprefix("torch."))
    if ranks.master:
        write_results(results, cfg["out"])
    return results


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # under torchrun; NCCL warns of leaked resources otherwise
        torch.distributed.destroy_process_group()
