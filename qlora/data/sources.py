"""Where rows come from, as a `datasets.Dataset`: the built-in chatterbot conversations, a local
JSON / JSONL / CSV / Parquet file, a `Dataset.save_to_disk` folder, a folder of data files, or a
hub data set (with its subset `name`, `data_files` and `split`) when the hub is reachable.

Files go through `datasets.load_dataset`, so they are converted to Arrow once and memory-mapped
from the datasets cache afterwards, and every later `map` over them is cached too. Local text
files are checked first (`qlora.data.checks`), so a broken line is named before datasets' own
generic "An error occurred while generating the dataset".
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from qlora.config_data import DatasetSpec
from qlora.data.checks import check_data_file
from qlora.errors import UsageError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BUILT_IN = ("chatterbot", "chatterbot-pairs")  # chatterbot-pairs: preference pairs (qlora.data.pairs)
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def _chatterbot_folder(language: str) -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")  # locate without importing its package code
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("data.dataset 'chatterbot' needs the chatterbot-corpus package: pip install "
                         "chatterbot-corpus==1.3.3 (`make install` or pip install -e '.[embedded]' installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / language


def chatterbot_rows(language: str = "english") -> list[dict[str, Any]]:
    """The chatterbot-corpus conversations as chat rows, files in sorted order.

    Each corpus conversation alternates user / assistant strings; a trailing user turn without an
    answer is dropped. A malformed conversation (not a list of strings) becomes an empty one, so
    the row checks skip and count it like any other empty row.
    """
    rows = []
    for path in sorted(_chatterbot_folder(language).glob("*.yml")):
        for conversation in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations", []):
            ok = isinstance(conversation, list) and all(isinstance(t, str) for t in conversation)
            usable = conversation[: len(conversation) // 2 * 2] if ok else []
            rows.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                      for i, t in enumerate(usable)]})
    if not rows:
        raise UsageError(f"no chatterbot conversations found for language {language!r}")
    return rows


def _chatterbot_generator(language: str, corpus: str):
    yield from chatterbot_rows(language)


def _pairs_generator(seed: int, corpus: str):
    from qlora.data.pairs import chatterbot_pairs

    yield from chatterbot_pairs(chatterbot_rows(), seed)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_source(spec: DatasetSpec):
    """The rows of one data set as a `datasets.Dataset`."""
    import datasets

    if spec.path in BUILT_IN:  # through the cache (keyed by the corpus version), so maps are cached too
        from importlib.metadata import version

        from qlora.data.pairs import PAIRS_SEED

        _chatterbot_folder("english")  # a missing corpus is named here, not inside the generator
        if spec.path == "chatterbot-pairs":
            return datasets.Dataset.from_generator(_pairs_generator, gen_kwargs={
                "seed": PAIRS_SEED, "corpus": version("chatterbot-corpus")})
        return datasets.Dataset.from_generator(_chatterbot_generator, gen_kwargs={
            "language": "english", "corpus": version("chatterbot-corpus")})
    path = Path(spec.path).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
        return _saved(path, spec.split)
    if path.is_file() or builder is not None:
        return _file(path, builder)
    if path.is_dir():  # a folder of data files: datasets' packaged loaders read it, like a hub repo
        return _load(spec, where=f"data folder {spec.path!r}")
    if _offline():
        raise UsageError(f"data set {spec.path!r} is not a local file or folder or a built-in name "
                         f"({', '.join(BUILT_IN)}), and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    return _load(spec, where=f"hub data set {spec.path!r}")


def _file(path: Path, builder: str | None):
    import datasets

    if not path.exists():
        raise UsageError(f"data file {str(path)!r} does not exist")
    if builder is None:
        raise UsageError(f"data file {str(path)!r}: unknown extension {path.suffix!r}; "
                         f"allowed: {', '.join(FILE_BUILDERS)}, or a save_to_disk folder")
    check_data_file(path, builder)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets / pyarrow raise many types for unreadable files
        raise UsageError(f"cannot read data file {str(path)!r} as {builder}: {e}") from None


def _saved(path: Path, split: str):
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UsageError(f"data folder {str(path)!r}: cannot read it as a save_to_disk folder ({e})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UsageError(f"data folder {str(path)!r} has no split {split!r}; splits: {', '.join(saved)} "
                             "(set data.split)")
        saved = saved[split]
    return saved


def _load(spec: DatasetSpec, where: str):
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files, split=spec.split)
    except Exception as e:  # network, missing data set / config / split / files
        details = ", ".join(f"{k} {v!r}" for k, v in (("name", spec.name), ("data_files", spec.data_files),
                                                       ("split", spec.split)) if v is not None)
        raise UsageError(f"cannot load {where} ({details}): {e}") from None
