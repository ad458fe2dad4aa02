#!/usr/bin/env python
"""Hostile-user trials of `qlora train` on the tiny recipe, summarised as one table.

    python tools/chaos.py [--trials 3] [--steps 8] [--seed 0] [--keep DIR]

Every trial runs the real CLI in a subprocess on `recipes/tiny_smoke.yaml` (a random tiny Llama,
`train.max_steps=--steps`, a checkpoint every 2 steps) and is compared with one uninterrupted
reference run of the same recipe:

- kill -9: a run is killed with SIGKILL at a random moment after its first checkpoint appeared
  (sometimes mid-checkpoint), then continued with `--resume`. Survived: the resume exits 0 and
  metrics.jsonl holds each step once. Bit-identical: the final adapter's bytes equal the reference's.
- corrupt newest checkpoint: a finished run's newest checkpoint gets a truncated adapter, a
  truncated trainer state or a flipped byte; `--resume` must skip it (naming it), continue from the
  one before and end with the reference's bytes.
- NaN step: one step's gradients are made NaN (`QLORA_INJECT_NAN_STEPS`); the run must skip that
  step and exit 0 with finite adapter weights and strict-JSON metrics. Not comparable bit for bit
  (the skipped step changes the trajectory): shown as "-".
- NaN streak: every step from the 3rd on is NaN with `train.max_bad_steps=2`; the run must exit 3
  and leave its last checkpoint verified and finite, with no final adapter written.
- concurrent runs: two runs start on one folder at once; exactly one may run (exit 0), the other
  must exit 2 naming the live run, and the winner's adapter must equal the reference's.
- --overwrite and the stale-lock race: tools/chaos_writes.py (merge / quantize --overwrite pointed
  at a run, the folder of runs, a live run and their own input must all be refused and change
  nothing; processes released together on a stale lock must leave one holder at a time).

Exit status 0 when every trial survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_smoke.yaml"
ADAPTER = Path("adapter") / "adapter_model.safetensors"
sys.path.insert(0, str(REPO))  # this checkout's qlora, as the `-m qlora.cli` subprocesses (cwd REPO) use
from tools.chaos_writes import lock_race_trial, overwrite_trial  # noqa: E402


def train(out: Path, steps: int, *extra: str, env: dict | None = None, wait: bool = True):
    """Start `qlora train` on the tiny recipe; returns the finished process (or the running one)."""
    cmd = [sys.executable, "-m", "qlora.cli", "train", str(TINY), f"output.dir={out}",
           f"train.max_steps={steps}", "--samples", "0", *extra]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=900)
    return proc


def adapter_bytes(run: Path) -> bytes | None:
    return (run / ADAPTER).read_bytes() if (run / ADAPTER).is_file() else None


def steps_once(run: Path, steps: int) -> bool:
    """metrics.jsonl is strict JSON and holds each train step 1..steps exactly once."""
    def refuse(name):
        raise ValueError(name)
    try:
        records = [json.loads(line, parse_constant=refuse)
                   for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return False
    return [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))


def adapter_finite(folder: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(folder / ADAPTER.name).values())


# ------------------------------------------------------------------------------------- trials
# Each returns (survived, bit_identical or None when not comparable).


def kill_trial(work: Path, steps: int, reference: bytes, rng: random.Random):
    run = work / "run"
    proc = train(run, steps, wait=False)
    deadline = time.time() + 600
    while not list((run / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = train(run, steps, "--resume")
    ok = resumed.returncode == 0 and steps_once(run, steps)
    return ok, adapter_bytes(run) == reference


def corrupt_trial(work: Path, steps: int, reference_run: Path, reference: bytes, rng: random.Random):
    run = work / "run"
    shutil.copytree(reference_run, run)
    newest = max((run / "checkpoints").glob("step-*"))
    target = rng.choice([newest / ADAPTER, newest / "trainer_state.rank0.pt"])
    data = bytearray(target.read_bytes())
    if rng.random() < 0.5:
        data = data[: len(data) // 2]  # truncated
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte
    target.write_bytes(bytes(data))
    shutil.rmtree(run / "adapter")
    resumed = train(run, steps, "--resume")
    ok = resumed.returncode == 0 and newest.name in resumed.stderr_text and steps_once(run, steps)
    return ok, adapter_bytes(run) == reference


def nan_trial(work: Path, steps: int, rng: random.Random):
    run = work / "run"
    bad = rng.randint(2, steps)
    done = train(run, steps, env={"QLORA_INJECT_NAN_STEPS": str(bad)})
    ok = done.returncode == 0 and steps_once(run, steps) and adapter_finite(run / "adapter")
    return ok, None


def streak_trial(work: Path, steps: int):
    from qlora.training.checkpoint import verify

    run = work / "run"
    bad = ",".join(str(s) for s in range(3, steps + 1))
    done = train(run, steps, "train.max_bad_steps=2", env={"QLORA_INJECT_NAN_STEPS": bad})
    kept = sorted((run / "checkpoints").glob("step-*"))
    ok = (done.returncode == 3 and "Traceback" not in done.stderr_text and not (run / "adapter").exists()
          and bool(kept) and verify(kept[-1]) is None and adapter_finite(kept[-1] / "adapter"))
    return ok, None


def concurrent_trial(work: Path, steps: int, reference: bytes):
    run = work / "run"
    procs = [train(run, steps, wait=False) for _ in range(2)]
    results = [(p.wait(timeout=900), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    ok = codes == [0, 2] and "in use by a live run" in refused[0] and steps_once(run, steps)
    return ok, adapter_bytes(run) == reference


# ------------------------------------------------------------------------------------- main


def run_trials(trials: int, steps: int, seed: int, root: Path) -> list[tuple[str, int, int, str]]:
    """Run every kind of trial `trials` times; rows of (kind, tried, survived, bit-identical)."""
    rng = random.Random(seed)
    reference_run = root / "reference"
    done = train(reference_run, steps)
    if done.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{done.stderr_text[-3000:]}")
    reference = adapter_bytes(reference_run)
    kinds = {
        "kill -9 + --resume": lambda w: kill_trial(w, steps, reference, rng),
        "corrupt newest checkpoint + --resume": lambda w: corrupt_trial(w, steps, reference_run, reference, rng),
        "NaN gradient at one step": lambda w: nan_trial(w, steps, rng),
        "NaN streak (max_bad_steps=2) -> exit 3": lambda w: streak_trial(w, steps),
        "two runs on one folder": lambda w: concurrent_trial(w, steps, reference),
        "--overwrite at a run, runs, a live run, the input": lambda w: overwrite_trial(w, steps, reference_run, train,
                                                                                      steps_once),
        "stale lock race (20 x 3 processes)": lock_race_trial,
    }
    rows = []
    for kind, trial in kinds.items():
        outcomes = []
        for i in range(trials):
            work = root / f"{kind.split()[0].lower()}-{len(rows)}-{i}"
            work.mkdir()
            outcomes.append(trial(work))
            print(f"  {kind} #{i + 1}: survived={outcomes[-1][0]} bit-identical={outcomes[-1][1]}",
                  file=sys.stderr, flush=True)
        comparable = [same for _, same in outcomes if same is not None]
        rows.append((kind, trials, sum(ok for ok, _ in outcomes),
                     f"{sum(comparable)}/{len(comparable)}" if comparable else "-"))
    return rows


def print_table(rows: list[tuple[str, int, int, str]]) -> None:
    print("| trial | tried | survived | bit-identical |\n|---|---|---|---|")
    for kind, tried, survived, same in rows:
        print(f"| {kind} | {tried} | {survived} | {same} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials of each kind (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per run (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and corruptions")
    parser.add_argument("--keep", type=Path, help="keep the run folders under this folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qlora-chaos-", dir=args.keep))
    try:
        rows = run_trials(args.trials, args.steps, args.seed, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows)
    return 0 if all(survived == tried for _, tried, survived, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
