"""The lock-takeover race, as a trial (tests/test_lock.py and tools/chaos.py run it).

`race(root, trials, processes)`: each trial is a folder holding a stale `run.lock` (a dead pid, or
an empty file as a full disk leaves it). `processes` worker processes, started once, wait for each
trial's start time (a common deadline, busy-waited, so they are released within microseconds of
each other), then all try `run_lock` on that folder; a winner records when it held the lock and
holds it 20 ms. A trial fails when two holders' intervals overlap. Returns the failed trials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLD_S = 0.02
GAP_S = 0.06

WORKER = r"""
import json, sys, time
from qlora.errors import UsageError
from qlora.training.lock import run_lock
plan = json.loads(open(sys.argv[1]).read())
for folder, start in plan:
    while time.time() < start:
        pass
    try:
        with run_lock(__import__("pathlib").Path(folder)):
            t0 = time.time()
            time.sleep(%(hold)r)
            t1 = time.time()
        with open(folder + "/holders.txt", "a") as f:
            f.write(f"{t0} {t1}\n")
    except UsageError:
        pass
"""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_lock(folder: Path, pid: int, empty: bool) -> None:
    folder.mkdir(parents=True)
    lock = folder / "run.lock"
    if empty:
        lock.write_text("")
        old = time.time() - 60
        os.utime(lock, (old, old))  # an empty lock past the settle time: a run that died writing it
    else:
        lock.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": time.time() - 60}))
    (folder / "metrics.jsonl").write_text("")  # keeps the folder after a winner releases


def race(root: Path, trials: int, processes: int) -> list[str]:
    pid = dead_pid()
    folders = [root / f"trial-{i:04d}" for i in range(trials)]
    for i, folder in enumerate(folders):
        stale_lock(folder, pid, empty=i % 4 == 3)
    start = time.time() + 1.5 + 0.05 * processes  # the workers' imports take a moment
    plan = root / "plan.json"
    plan.write_text(json.dumps([[str(f), start + i * GAP_S] for i, f in enumerate(folders)]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER % {"hold": HOLD_S}, str(plan)], env=env,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    errors = [w.communicate(timeout=120 + trials * GAP_S)[1] for w in workers]
    if any(w.returncode for w in workers):
        raise RuntimeError("a race worker failed:\n" + "\n".join(errors)[-3000:])
    return [f.name for f in folders if _failed(f)]


def _failed(folder: Path) -> bool:
    """No one took the stale lock over, or two holders' intervals overlap."""
    path = folder / "holders.txt"
    spans = sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines()) if path.exists() else []
    return not spans or any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
