"""Output folders of `qlora merge`, `quantize` and `combine`: what `--overwrite` may replace.

`--overwrite` used to delete whatever folder it was pointed at: a folder of runs, a live run (whose
lock and metrics went, while it kept training into the new folder), the command's own input. Now
every such writer puts a provenance file, `qlora_output.json` (`{"kind": "merged", "written_by":
"qlora merge", "inputs": [...]}`), in what it writes, and `check_destination` runs before any model
loads and lets `--overwrite` replace only

    a folder whose provenance file has the writer's own kind (or an empty folder),
    that is not locked by a live run, and is neither one of the inputs nor holds one.

Everything else is refused with one line saying what the folder is (a run folder, a folder of runs,
an input, a folder qlora did not write) and nothing is touched. The check is about what a user
asked for, not a security boundary: the folder is replaced later by an atomic rename
(`qlora.io.atomic_folder`).

Killed writes: `atomic_folder` builds under `.NAME.tmp-<pid>_XXXX`; `check_destination` deletes the
ones of this output whose process is gone (a killed merge left a full model copy there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from qlora.errors import UsageError
from qlora.lockfile import describe, live_owner
from qlora.run_dir import LOCK, RunDir

PROVENANCE = "qlora_output.json"
WRITERS = {"merged": "qlora merge", "quantized": "qlora quantize", "combined": "qlora combine"}
_TEMP = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)_\w+$")


def provenance(kind: str, inputs: Iterable[str | Path]) -> dict:
    """The provenance record a writer of `kind` puts in its output folder."""
    return {"kind": kind, "written_by": WRITERS[kind], "inputs": [str(p) for p in inputs]}


def write_provenance(folder: Path, record: dict | None) -> None:
    if record is not None:
        (folder / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def written_kind(folder: Path) -> str | None:
    """The kind a qlora writer recorded in `folder`, or None."""
    try:
        return json.loads((folder / PROVENANCE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_destination(out_dir: str | Path, overwrite: bool, kind: str, inputs: Iterable[str | Path] = ()) -> Path:
    """`out_dir` if the `kind` writer may write there (see the module docstring); else a UsageError."""
    out = Path(out_dir)
    remove_stale_temps(out)
    if not out.exists():
        return out
    where = f"output {str(out)!r}"
    for item in inputs:
        if Path(item).exists() and _contains(out, Path(item)):
            what = "is" if out.resolve() == Path(item).resolve() else "holds"
            raise UsageError(f"{where} {what} this command's input {str(item)!r}; choose another output folder")
    if not overwrite:
        raise UsageError(f"{where} already exists; choose another path or pass --overwrite")
    if not out.is_dir():
        raise UsageError(f"{where} is a file, not a folder {WRITERS[kind]} wrote; refusing to replace it")
    owner = live_owner(out / LOCK)
    if owner is not None:
        raise UsageError(f"output {describe(out / LOCK, owner)}; --overwrite never replaces a live run")
    if written_kind(out) == kind or not any(out.iterdir()):
        return out
    raise UsageError(f"{where} {_what(out)}; --overwrite replaces only a folder {WRITERS[kind]} wrote "
                     f"(with its {PROVENANCE}). Delete it yourself or choose another path")


def _contains(folder: Path, item: Path) -> bool:
    folder, item = folder.resolve(), item.resolve()
    return item == folder or folder in item.parents


def _what(out: Path) -> str:
    """What an existing folder is, in a few words, for a refusal."""
    kind = written_kind(out)
    if kind is not None:  # before the run markers: a merged model holds its run's recipe.yaml
        return f"holds a {kind} {'adapter' if kind == 'combined' else 'model'} written by {WRITERS.get(kind, 'qlora')}"
    if RunDir(out).is_run() or (out / LOCK).exists():
        return "is a qlora run folder"
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and (RunDir(p).is_run() or (p / LOCK).exists()))
    if runs:
        return f"holds qlora runs ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''})"
    return "was not written by qlora"


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete `.OUT.tmp-<pid>_*` / `.OUT.old-<pid>_*` siblings of `out` whose process is gone."""
    parent, found = out.parent, []
    if not parent.is_dir():
        return found
    for path in parent.iterdir():
        match = _TEMP.match(path.name)
        if match and match["name"] == out.name and not _running(int(match["pid"])):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            found.append(path)
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
