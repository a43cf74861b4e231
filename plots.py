"""Figures where people would rather look than read, drawn only when matplotlib is installed
(`pip install -e ".[plot]"`); without it every function returns None and nothing else changes.

    routing_heatmap(results, path)     eval.py: calls per (expert, skill) of an evaluation
    learning_curve(metrics, path)      train.py: accuracy and top-pair share per source against the step
"""
import json
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def routing_heatmap(results: dict, path):
    """eval.summarize's calls table {expert: {skill: count}} as a heatmap PNG; returns the path."""
    plt = _pyplot()
    experts = sorted(results["calls"])
    skills = sorted({skill for row in results["calls"].values() for skill in row})
    if plt is None or not experts:
        return None
    counts = [[results["calls"][e].get(s, 0) for s in skills] for e in experts]
    figure, axes = plt.subplots(figsize=(1.2 * len(skills) + 3, 0.6 * len(experts) + 2))
    image = axes.imshow(counts, cmap="viridis")
    axes.set_xticks(range(len(skills)), skills, rotation=45, ha="right")
    axes.set_yticks(range(len(experts)), experts)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            axes.text(j, i, count, ha="center", va="center", color="white" if count < max(map(max, counts)) / 2 else "black")
    axes.set_title(f"calls per expert and skill (accuracy {results['accuracy']:.3f})")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def learning_curve(metrics_path, path):
    """train.py's metrics.jsonl against the GRPO step: the accuracy of each step's training rollouts
    and of the periodic sampled evaluations (phase "eval"; gated ones are few), and the share of the
    most used first (expert, skill) pair per data source in the training rollouts."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("phase") == "grpo"]
    evals = [r for r in records if r.get("phase") == "eval"]
    if plt is None or not (steps or evals):
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in steps], [r["accuracy"] for r in steps], linewidth=1, label="training rollouts")
    left.plot([r["step"] for r in steps], [r.get("format_valid_rate", float("nan")) for r in steps], linewidth=1,
              linestyle="--", label="format valid (training)")
    left.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o", linestyle="",
              label="sampled evaluation")
    left.set(xlabel="GRPO step", ylim=(0, 1.02), title="accuracy")
    left.legend()
    sources = sorted({k.split("/")[1] for r in steps for k in r if k.startswith("route/")})
    for source in sources:
        right.plot([r["step"] for r in steps], [r.get(f"route/{source}/max_pair_share") for r in steps],
                   linewidth=1, label=source)
    right.set(xlabel="GRPO step", ylim=(0, 1.02), title="share of the top first pair in training, per source")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
