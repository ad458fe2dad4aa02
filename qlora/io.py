"""Atomic writes: a reader (or a crash) never sees a half-written output file or folder.

A file goes to a temporary file in the destination folder, which is then renamed over the target
(atomic on POSIX within one file system). The temporary file gets the permissions a plain `open`
would have given (0666 minus the umask), not mkstemp's private 0600. A folder is built under a
temporary sibling name and renamed into place the same way (`atomic_folder`), with a plain
`mkdir`'s permissions (0777 minus the umask, so 0755 under the usual 022), not mkdtemp's 0700:
adapters and model folders are meant to be shared. Files and folders
are fsynced before the rename and the parent folder after it, so a power cut cannot publish a name
whose bytes never reached the disk. A run killed mid-write leaves its temporary names behind
(`.NAME.XXXX.tmp` files, `.NAME.tmp-<pid>_XXXX` / `.NAME.old-<pid>_XXXX` folders); `remove_leftovers`
deletes them at the next start, once the run folder's lock is held, and `qlora.outputs` deletes a
dead writer's ones beside a merge / quantize / combine output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qlora.errors import UsageError

_LEFTOVER = re.compile(r"^\..+(\.tmp|\.tmp-\w+|\.old-\w+)$")  # the temporary names used below


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_permissions(path: str | os.PathLike) -> None:
    """Give a file written by a library the permissions a plain `open` would have (0666 minus the
    umask): safetensors' `save_file` creates its files 0600, unreadable by anyone else."""
    os.chmod(path, 0o666 & ~_umask())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f, named_os_errors(path):
            f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that opens the file itself (e.g. a GGUF
    writer); when the block succeeds it is fsynced and renamed over `path`, else deleted."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with named_os_errors(path):  # a file's fsync error (ENOSPC, EIO) is real: not swallowed
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        plain_permissions(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def named_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """An OSError of the block that names no file (a write's ENOSPC) is raised again naming `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; move it to ``final`` when the block succeeds.

    If ``final`` exists by then it is replaced when ``replace`` is true; otherwise the existing
    folder is kept (another process built it concurrently) and the temporary one is discarded.
    On an exception nothing is left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}_", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        with named_os_errors(final):
            yield tmp
        _fsync_tree(tmp)
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}_", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        fsync_path(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the data files were synced
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        fsync_path(path)
    fsync_path(folder)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files and folders a killed atomic write left in `folder`; returns them."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _LEFTOVER.match(p.name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"output {out_dir} already exists; choose another path or pass --overwrite")
    return out_dir
