"""Atomic file writes: a reader (or a crash) never sees a half-written output file.

Data goes to a temporary file in the destination folder, which is then renamed over the target
(atomic on POSIX within one file system). The temporary file gets the permissions a plain `open`
would have given (0666 minus the umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qlora.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
