"""One live run per run folder: a lock file holding the owner's pid, host and start time.

Two runs on one `output.dir` used to interleave their metrics and checkpoints, and `--overwrite`
deleted the folder of a live run (which kept writing into the new one). Now the main process
creates `<run>/run.lock` with `O_CREAT | O_EXCL` before it checks or touches anything else, and
removes it when the run ends, however it ends short of `kill -9`.

A lock left by a killed run is stale: its host is this host and its pid is gone, or the pid now
belongs to a process started after the lock was written (a reused pid; Linux tells a process's
start time). A stale lock is taken over with a note. A lock from another host cannot be checked
from here, so it is refused with the command that removes it. Once the lock is held, temporary
files and folders a killed write left behind (`qlora.io.remove_leftovers`) are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from qlora.errors import UsageError
from qlora.io import remove_leftovers
from qlora.run_dir import CHECKPOINTS, LOCK

log = logging.getLogger("qlora")


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (creating the folder; an empty folder we made is removed)."""
    if not enabled:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    _acquire(path)
    try:
        for folder in (run_dir, run_dir / CHECKPOINTS):
            remove_leftovers(folder)
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a start that failed before writing anything leaves nothing behind


def _acquire(path: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):  # a stale lock is moved aside, then creation is retried
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return
    raise UsageError(f"{path}: could not take the run folder's lock (another run keeps taking it)")


def _take_over_if_stale(path: Path) -> None:
    """Remove `path` when its owner is dead; raise a UsageError naming a live owner."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
    except FileNotFoundError:
        return  # released meanwhile
    except (ValueError, KeyError, TypeError):
        # Being written right now, or damaged: give a writer a moment before calling it stale.
        if time.time() - path.stat().st_mtime < 5:
            raise UsageError(f"output.dir {str(path.parent)!r} is in use by a live run that is starting "
                             f"(lock file {path})") from None
        pid, host, started = -1, socket.gethostname(), 0.0
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    if host != socket.gethostname():
        raise UsageError(f"output.dir {str(path.parent)!r} is locked by a run on host {host!r} (pid {pid}, "
                         f"started {since}); if that run is gone, delete {path}")
    if _alive(pid, started):
        raise UsageError(f"output.dir {str(path.parent)!r} is in use by a live run (pid {pid}, started {since}); "
                         "wait for it, stop it, or choose another output.dir (--overwrite and --resume "
                         "never take over a live run)")
    log.warning("%s: removing the stale lock of run pid %d (started %s, no longer running)", path, pid, since)
    aside = path.with_name(f".{LOCK}.stale-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, aside)  # atomic: of two processes taking over, one moves it, both retry
        aside.unlink()


def _alive(pid: int, lock_started: float) -> bool:
    """True when process `pid` exists and is not a newer process that reused the pid."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False  # our own lock from an earlier run in this process that was not released
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    started = _process_start_time(pid)
    return started is None or started <= lock_started + 1.0


def _process_start_time(pid: int) -> float | None:
    """Unix time process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def clear_run_dir(run_dir: Path) -> None:
    """Delete an old run's files for --overwrite, keeping this run's lock."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
