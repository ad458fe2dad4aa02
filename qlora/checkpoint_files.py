"""Finding and verifying a run's checkpoints: what training resumes from and eval falls back on.

`checkpoints/step-NNNNNN/manifest.json` records every file's size and SHA-256 at write time
(`write_manifest`); `verify` checks them, and `latest_checkpoint` is the newest checkpoint that still
verifies, naming each one it skips. Checkpoints written before manifests existed are accepted as
they are. Kept apart from `qlora.training.checkpoint` (which writes and loads them) so that eval and
generate, which never import training code, can use a run's newest checkpoint too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from qlora.io import write_json_atomic
from qlora.run_dir import CHECKPOINTS

STATE_FILE = "trainer_state.rank{rank}.pt"
MANIFEST = "manifest.json"
log = logging.getLogger("qlora")
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step that verifies against its manifest, or None."""
    folder = run_dir / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _STEP_DIR.search(p.name))] \
        if folder.is_dir() else []
    for _, path in sorted(found, reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file under `folder` in `folder/manifest.json`."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"files": files})


def verify(folder: Path) -> str | None:
    """None when the checkpoint `folder` is complete and unaltered, else what is wrong with it."""
    if not (folder / STATE_FILE.format(rank=0)).is_file():
        return f"no {STATE_FILE.format(rank=0)}"
    if not (folder / MANIFEST).is_file():
        return None  # written before manifests existed
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if _digest(path) != want["sha256"]:
            return f"{name} does not match the checksum recorded when it was written"
    return None
