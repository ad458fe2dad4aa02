"""The trials of tools/chaos.py that point writers at what they must not destroy, and race the lock.

- overwrite: `qlora merge ADAPTER OUT --overwrite` with OUT a finished run, the folder holding the
  runs, a run that is training right now, and its own adapter; `qlora quantize SRC SRC --overwrite`.
  Survived: each exits 2 with one line and no traceback, every byte of those folders is unchanged,
  the live run still ends with exit 0 and each step logged once, and `--overwrite` of a folder
  merge itself wrote still works (exit 0).
- stale lock race: `tools/lock_race.py`'s trial (processes released together on a stale
  `run.lock`, a dead pid's or an empty one); survived: every trial had exactly one holder at a time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _digest(folder: Path, skip: tuple[str, ...] = ()) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(skip):
            sha.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return sha.hexdigest()


def _refused(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def overwrite_trial(work: Path, steps: int, reference_run: Path, train, steps_once) -> tuple[bool, None]:
    """See the module docstring; `train` and `steps_once` are tools/chaos.py's."""
    import shutil

    runs = work / "runs"
    finished = runs / "finished"
    shutil.copytree(reference_run, finished)
    (runs / "notes.txt").write_text("mine")
    adapter = finished / "adapter"
    live = runs / "live"
    live_steps = steps * 10  # long enough to be alive while merge is pointed at it
    proc = train(live, live_steps, wait=False)
    deadline = time.time() + 300
    while not (live / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    finished_before = _digest(finished)
    at_live = _cli("merge", str(adapter), str(live), "--overwrite")
    alive_during = proc.poll() is None and "live run" in at_live.stderr
    attempts = [at_live, *(_cli("merge", str(adapter), str(out), "--overwrite") for out in (finished, runs, adapter))]
    made = _cli("quantize", "tiny-llama", str(work / "q4"))
    attempts.append(_cli("quantize", str(work / "q4"), str(work / "q4"), "--overwrite"))
    proc.communicate(timeout=900)
    merged = work / "merged"
    again = [_cli("merge", str(adapter), str(merged), *flag) for flag in ((), ("--overwrite",))]
    ok = (all(_refused(r) for r in attempts) and alive_during and proc.returncode == 0
          and steps_once(live, live_steps) and _digest(finished) == finished_before
          and (runs / "notes.txt").read_text() == "mine" and made.returncode == 0
          and all(r.returncode == 0 for r in again))
    return ok, None


def lock_race_trial(work: Path, trials: int = 20, processes: int = 3) -> tuple[bool, None]:
    from tools.lock_race import race

    with tempfile.TemporaryDirectory(dir=work) as root:
        return race(Path(root), trials, processes) == [], None
