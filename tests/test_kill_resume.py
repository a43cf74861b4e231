"""Interrupted training: train.py killed with SIGKILL (no chance to clean up) always leaves a
loadable latest checkpoint and a parseable metrics log, and --resume auto then finishes with the
same metrics and the same final weights as a run that was never interrupted.

The fast test kills once during a checkpoint write, found by polling the file system for the
temporary checkpoint directory (no test hooks in train.py). The randomized version (kills at random
moments: during rollouts, updates and checkpoint writes, several times in a row) is opt-in:
pytest -m slow tests/test_kill_resume.py
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
# as tests/test_train.py's JOB: tiny steps, a KL term so every step moves the weights; save every step
JOB = ["--sft_steps", "0", "--prompts_per_step", "4", "--group_size", "2", "--max_turns", "1",
       "--max_turn_tokens", "6", "--max_response_tokens", "40", "--eval_every", "0", "--num_train", "32",
       "--num_test", "4", "--save_every", "1", "--drop_zero_adv", "false", "--lr", "1e-2",
       "--kl_coef", "0.1", "--kl_kind", "k1", "--threads", "1"]
DETERMINISTIC = ("mean_reward", "loss", "kl_ref", "tokens/policy_mean", "grad_norm")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def args(tiny_dir, out, steps, resume=False):
    return ["--model", str(tiny_dir), "--out", str(out), "--steps", str(steps), *JOB,
            *(["--resume", "auto"] if resume else [])]


def start_job(tiny_dir, out, steps, resume=False):
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "ab")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(tiny_dir, out, steps, resume)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def metrics(out):
    """Records of metrics.jsonl; only the last line may be half-written."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert number == len(lines), f"line {number} of {len(lines)} is not JSON: {line[:80]!r}"
    return records


def check_after_kill(out):
    """Invariants after a SIGKILL: the latest complete checkpoint loads, the log parses."""
    records = metrics(out)
    checkpoints = train.checkpoint_dirs(out)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    step = int(latest.name.split("_")[1])
    load_policy(latest / "policy")
    optimizer_state = torch.load(latest / "optimizer.pt", weights_only=True)
    assert optimizer_state.get("state") or step == 0, step  # empty only before the first GRPO step: a fresh AdamW
    assert json.loads((latest / "config.json").read_text())["out"] == str(out)
    assert (latest / "trainer_state.pt").stat().st_size > 0   # loaded for real by the resume
    assert {r["step"] for r in records if r.get("phase") == "grpo"} >= set(range(1, step + 1))
    return step


def same_results(straight, resumed, steps):
    a = [r for r in metrics(straight) if r.get("phase") == "grpo"]
    b = [r for r in metrics(resumed) if r.get("phase") == "grpo"]
    assert [r["step"] for r in b] == list(range(1, steps + 1))     # no step lost or repeated
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    wa, wb = load_policy(straight / "final")[0].state_dict(), load_policy(resumed / "final")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for(condition, proc, seconds=180.0, poll=0.001):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def test_sigkill_during_a_checkpoint_write_then_resume_matches(tiny_dir, tmp_path):
    steps = 3
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.main(args(tiny_dir, straight, steps))

    proc = start_job(tiny_dir, killed, steps)
    writing = killed / ".tmp_ckpt_000002"  # step 2's checkpoint, after step 1's completed
    try:
        caught = wait_for(writing.exists, proc)
    finally:
        if proc.poll() is None:
            sigkill(proc)
    assert caught, f"never saw {writing} (log: {(tmp_path / 'killed.log').read_bytes()[-2000:]!r})"
    assert check_after_kill(killed) in (1, 2)  # the write was interrupted, or had just finished
    train.main(args(tiny_dir, killed, steps, resume=True))
    same_results(straight, killed, steps)


@pytest.mark.slow
def test_random_sigkills_then_resume_match_an_uninterrupted_run(tiny_dir, tmp_path):
    """Five kills per job at random moments: some right after a temporary checkpoint directory
    appears (plus a random few ms, so different phases of the write are hit), the others after a
    random delay (rollouts, updates, start-up, the resume's own log rewrite)."""
    rng = random.Random(7)
    steps = 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.main(args(tiny_dir, straight, steps))
    kills, mid_write = 0, 0
    for attempt in range(5):
        resume = bool(train.checkpoint_dirs(killed)) if killed.exists() else False
        proc = start_job(tiny_dir, killed, steps, resume)
        before = set(os.listdir(killed))
        try:
            if attempt % 2 == 0:
                wait_for(lambda: any(n.startswith(".tmp_ckpt_") and n not in before for n in os.listdir(killed)), proc)
                time.sleep(rng.uniform(0, 0.03))
            else:
                time.sleep(rng.uniform(2.0, 12.0))
        finally:
            if proc.poll() is None:
                sigkill(proc)
                kills += 1
                mid_write += any(n.startswith(".tmp_ckpt_") and n not in before for n in os.listdir(killed))
        check_after_kill(killed)
    assert kills >= 3 and mid_write >= 1, (kills, mid_write)  # at least one kill hit a checkpoint write
    train.main(args(tiny_dir, killed, steps, resume=bool(train.checkpoint_dirs(killed))))
    same_results(straight, killed, steps)
