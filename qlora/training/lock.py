"""One live run per run folder: a lock file holding the owner's pid, host and start time.

Two runs on one `output.dir` used to interleave their metrics and checkpoints, and `--overwrite`
deleted the folder of a live run (which kept writing into the new one). Now the main process
creates `<run>/run.lock` with `O_CREAT | O_EXCL` before it checks or touches anything else, and
removes it when the run ends, however it ends short of `kill -9`.

A lock left by a killed run is stale and is taken over with a note, atomically, so that of several
runs started together on a stale lock exactly one wins (`qlora.lockfile`, which also tells which
locks are stale). Once the lock is held, temporary files and folders a killed write left behind
(`qlora.io.remove_leftovers`) are removed.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from qlora.io import remove_leftovers
from qlora.lockfile import acquire
from qlora.run_dir import CHECKPOINTS, LOCK

LIVE_HINT = ("; wait for it, stop it, or choose another output.dir (--overwrite and --resume never take over "
             "a live run)")


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (creating the folder; an empty folder we made is removed)."""
    if not enabled:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    acquire(path, "output.dir ", LIVE_HINT)
    try:
        for folder in (run_dir, run_dir / CHECKPOINTS):
            remove_leftovers(folder)
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a start that failed before writing anything leaves nothing behind


def clear_run_dir(run_dir: Path) -> None:
    """Delete an old run's files for --overwrite, keeping this run's lock."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
