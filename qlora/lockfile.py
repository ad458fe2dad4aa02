"""Lock files: one owner per folder, a dead owner's lock taken over atomically.

A lock is a file created with ``O_CREAT | O_EXCL`` holding its owner's pid, host and start time
(JSON). It is live while that process runs; it is stale when its host is this host and the pid is
gone, or the pid now belongs to a process started after the lock was written (a reused pid; Linux
tells a process's start time), or when it is empty or damaged and older than `SETTLE_S` (a run that
died while writing it, e.g. on a full disk). A lock from another host cannot be checked from here,
so it is refused with the command that removes it.

Taking over a stale lock. Two starters that both read the same stale lock must not both win, so
breaking it is a critical section of its own:

    1. read the lock: its identity (device, inode, mtime, size) and its bytes; decide it is stale
    2. create ``.<lock>.claim`` with O_EXCL (only one breaker at a time; the others retry)
    3. under the claim, read the lock again; unlink it only if identity and bytes are still the
       stale ones read in 1 (an inode alone could be reused by a lock created meanwhile)
    4. remove the claim, and try the O_EXCL creation again

Every unlink of a lock happens under the claim and after that check, so a lock created after
step 1 is never removed, and of the starters that retry, O_EXCL lets exactly one create the new
lock. A claim left by a breaker killed inside steps 2-4 (microseconds) is reported after
`SETTLE_S` with the command that removes it, never broken by guess.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import UsageError

log = logging.getLogger("qlora")
SETTLE_S = 5.0  # how long an empty / damaged lock or a claim may be "being written"
ATTEMPTS = 50


@dataclass(frozen=True)
class Owner:
    """What a lock file says: its owner, or `damaged` when it is empty or not the JSON we write."""

    pid: int
    host: str
    started: float
    damaged: bool = False

    @property
    def since(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _snapshot(path: Path) -> tuple[tuple, bytes] | None:
    """(identity, bytes) of the file at `path` read through one descriptor; None when absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return _identity(os.fstat(f.fileno())), f.read()
    except OSError:
        return None


def parse_owner(data: bytes, mtime: float) -> Owner:
    try:
        owner = json.loads(data.decode("utf-8"))
        return Owner(int(owner["pid"]), str(owner["host"]), float(owner["started"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return Owner(-1, socket.gethostname(), mtime, damaged=True)


def live_owner(path: Path) -> Owner | None:
    """The owner of the lock at `path` when it is live (or may be: another host, being written)."""
    snap = _snapshot(path)
    owner = parse_owner(snap[1], snap[0][2] / 1e9) if snap is not None else None
    return None if owner is None or _stale(owner) else owner


def _stale(owner: Owner) -> bool:
    if owner.damaged:
        return time.time() - owner.started >= SETTLE_S
    return owner.host == socket.gethostname() and not _alive(owner.pid, owner.started)


def describe(path: Path, owner: Owner) -> str:
    """A user's line about a live lock at `path` (what holds it and what to do)."""
    folder = str(path.parent)
    if owner.damaged:
        return f"{folder!r} is in use by a run that is starting (lock file {path} is being written)"
    if owner.host != socket.gethostname():
        return (f"{folder!r} is locked by a run on host {owner.host!r} (pid {owner.pid}, started {owner.since}); "
                f"if that run is gone, delete {path}")
    return f"{folder!r} is in use by a live run (pid {owner.pid}, started {owner.since})"


def acquire(path: Path, prefix: str = "", hint: str = "") -> None:
    """Create the lock `path` for this process, taking over a stale one; a UsageError for a live one.

    The refusal reads `prefix` + what holds it + `hint`. A write that fails (a full disk) removes
    the half-written lock and names it.
    """
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
    for _ in range(ATTEMPTS):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, prefix, hint)
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            path.unlink(missing_ok=True)
            raise UsageError(f"cannot write the lock file {path}: {err.strerror or err}") from None
        return
    raise UsageError(f"{path}: could not take the lock (other processes keep taking it)")


def _take_over_if_stale(path: Path, prefix: str, hint: str) -> None:
    """Remove `path` if it is (still) the stale lock read here; raise a UsageError naming a live owner."""
    snap = _snapshot(path)
    if snap is None:
        return  # released meanwhile
    owner = parse_owner(snap[1], snap[0][2] / 1e9)
    if not _stale(owner):
        raise UsageError(prefix + describe(path, owner) + hint)
    claim = path.with_name(f".{path.name}.claim")
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        _check_claim(claim)
        time.sleep(0.001)
        return  # another process is breaking it; retry the creation
    try:
        os.close(fd)
        if _snapshot(path) == snap:
            path.unlink()
            what = ("an empty or damaged lock file (a run died while writing it)" if owner.damaged
                    else f"run pid {owner.pid} (started {owner.since}) is no longer running")
            log.warning("%s: took over the stale lock: %s", path, what)
    finally:
        claim.unlink(missing_ok=True)


def _check_claim(claim: Path) -> None:
    try:
        age = time.time() - claim.stat().st_mtime
    except FileNotFoundError:
        return
    if age >= SETTLE_S:
        raise UsageError(f"{claim}: a lock takeover was interrupted {age:.0f} s ago; if no qlora process "
                         f"is starting on {str(claim.parent)!r}, delete {claim}")


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
