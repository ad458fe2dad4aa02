"""Where rows come from: the built-in chatterbot conversations, local JSON / JSONL / CSV / Parquet
files (read through `datasets`), or a hub data set when the hub is reachable. Rows are dicts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from qlora.data.checks import check_data_file
from qlora.errors import UsageError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

def chatterbot_rows(language: str = "english") -> list[dict[str, Any]]:
    """The chatterbot-corpus conversations as chat rows, files in sorted order.

    Each corpus conversation alternates user / assistant strings; a trailing user turn without an
    answer is dropped. Malformed conversations pass through unchanged as `messages`, so the row
    checks skip and count them like any other bad row.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")  # locate without importing its package code
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("data.dataset 'chatterbot' needs the chatterbot-corpus package: "
                         "pip install chatterbot-corpus==1.3.3 (or pip install -e '.[embedded]')")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    rows = []
    for path in sorted(folder.glob("*.yml")):
        for turns in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations", []):
            if isinstance(turns, list) and all(isinstance(t, str) for t in turns):
                turns = [{"role": ("user", "assistant")[i % 2], "content": t}
                         for i, t in enumerate(turns[: len(turns) // 2 * 2])]
            rows.append({"messages": turns})
    if not rows:
        raise UsageError(f"no chatterbot conversations found for language {language!r}")
    return rows


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a built-in data set, a local JSON/JSONL/CSV/Parquet file, or a hub data set."""
    if source == "chatterbot":
        return chatterbot_rows()
    import datasets

    path = Path(source).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None or path.exists():
        if not path.exists():
            raise UsageError(f"data file {source!r} does not exist")
        if builder is None:
            raise UsageError(f"data file {source!r}: unknown extension {path.suffix!r}; "
                             f"allowed: {', '.join(FILE_BUILDERS)}")
        check_data_file(path, builder)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
        except Exception as e:  # datasets / pyarrow raise many types for unreadable files
            raise UsageError(f"cannot read data file {source!r} as {builder}: {e}") from None
    if _offline():
        raise UsageError(f"data.dataset {source!r} is not a local file or a built-in name (chatterbot), "
                         "and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as e:  # network, missing data set, missing split
        raise UsageError(f"cannot load data set {source!r} split {split!r} from the hub: {e}") from None
