"""Rows checked and ready to tokenise: read every data set, map its columns, check every row, mix.

This stage needs no tokenizer and no torch, so `qlora train` runs it before anything heavy loads:
a bad data file is reported, with its file and row, within about a second of start.

    for each data set (`data.datasets`, or the one `data.dataset`):
        rows (sources) -> first max_rows -> data.columns renamed -> format resolved (formats)
        -> `Dataset.map(canonical)`: each row becomes {messages, prompt, completion, query} or a
           counted skip; a wrong-typed row stops here, named "<file> row <n>" (rows count from 1)
    held-out rows: data.eval_dataset, or a seeded draw from all data sets together
    training rows: each data set's repeated by its weight (a repeat factor per epoch)

The checking `map` runs with `data.num_proc` processes and is cached by datasets for file-backed
data sets, so a second run (or `qlora eval`) on unchanged data reads its result from the cache.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from qlora.config_data import DataConfig, DatasetSpec
from qlora.data.formats import BadRow, RowError, canonical, detect_format, known_columns
from qlora.data import preference_rows
from qlora.data.sources import load_source
from qlora.errors import UsageError
from qlora.hf.chat_template import is_template_file, read_template_file

log = logging.getLogger("qlora")


@dataclass
class Skips:
    """Rows skipped, by reason (which names the data set), with the first row of each reason."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, row: int, n: int = 1) -> None:
        self.counts[reason] += n
        self.first.setdefault(reason, row)


@dataclass
class Rows:
    """Canonical rows (`CANONICAL` columns) for training and evaluation, and what was skipped."""

    train: Any  # datasets.Dataset, training rows repeated by weight
    eval: Any  # datasets.Dataset, held-out rows (may be empty)
    labels: list[str]  # data set names, indexed by a row's `part`
    rows: int = 0  # rows read (after max_rows), skipped ones included
    skips: Skips = field(default_factory=Skips)
    separate_eval: bool = False  # eval rows come from data.eval_dataset


def _features():
    from datasets import Features, List, Value

    return Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                     "prompt": Value("string"), "completion": Value("string"), "query": Value("string"),
                     "skip": Value("string"), "part": Value("int64"), "row": Value("int64")})


def _schema(fmt: str):
    """(canonical row function, its datasets Features, a skipped row's columns) of format `fmt`."""
    if fmt in preference_rows.PREFERENCE_FORMATS:
        return preference_rows.canonical_preference, preference_rows.features(), preference_rows.empty_row()
    return canonical, _features(), {"messages": [], "prompt": "", "completion": "", "query": ""}


def _canonical_row(row: dict, index: int, *, fmt: str, part: int, label: str) -> dict:
    to_canonical, _, empty = _schema(fmt)
    try:
        out = {**to_canonical(row, fmt), "skip": ""}
    except BadRow as skip:
        out = {**empty, "skip": str(skip)}
    except RowError as err:
        raise UsageError(f"{label} row {index + 1}: {err}") from None
    return {**out, "part": part, "row": index + 1}


def map_columns(ds, columns: dict[str, str], label: str):
    """Rename the data set's columns to the format's (`columns`: format name -> data set name)."""
    for ours, theirs in columns.items():
        if ours not in known_columns():
            raise UsageError(f"data.columns: {ours!r} is not a column of any format; allowed: "
                             f"{', '.join(known_columns())}")
        if theirs not in ds.column_names:
            raise UsageError(f"data.columns: {label} has no column {theirs!r} (for {ours!r}); its columns: "
                             f"{', '.join(ds.column_names)}")
    clashing = [c for c in ds.column_names if c in columns and c not in columns.values()]
    ds = ds.remove_columns(clashing)
    return ds.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})


def _label(spec: DatasetSpec) -> str:
    """How messages name a data set: `data file 'x.jsonl'`, `data folder 'd'`, `data set 'org/name'`."""
    if spec.path in ("chatterbot", "chatterbot-pairs"):
        return spec.path
    path = Path(spec.path).expanduser()
    kind = "file" if path.is_file() else "folder" if path.is_dir() else "set"
    return f"data {kind} {spec.path!r}"


def data_sets(cfg: DataConfig) -> list[DatasetSpec]:
    """The data sets to read, with the `data.` defaults filled in (one when `data.datasets` is unset)."""
    entries = cfg.datasets or [{"path": cfg.dataset, "name": cfg.name, "data_files": cfg.data_files}]
    specs = [DatasetSpec(**entry) for entry in entries]
    for spec in specs:
        spec.format = spec.format or cfg.format
        spec.columns = cfg.columns if spec.columns is None else spec.columns
        spec.split = spec.split or cfg.split
    return specs


def read_part(spec: DatasetSpec, part: int, cfg: DataConfig, ds=None, max_rows: int | None = None):
    """One data set (`ds`, or read from `spec`) as canonical rows, skips still in (marked in `skip`)."""
    label = _label(spec) if ds is None else "the given rows"
    ds = load_source(spec) if ds is None else ds
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds = map_columns(ds, spec.columns or {}, label)
    fmt = detect_format(ds.column_names, spec.format, label)
    return ds.map(_canonical_row, with_indices=True, fn_kwargs={"fmt": fmt, "part": part, "label": label},
                  remove_columns=ds.column_names, features=_schema(fmt)[1], num_proc=_procs(cfg, len(ds)),
                  desc=f"checking {label}"), label


def _procs(cfg: DataConfig, n: int) -> int | None:
    return min(cfg.num_proc, n) if cfg.num_proc and n > 1 else None


def _good(ds, skips: Skips, label: str):
    """Rows of `ds` that are not skips; the skips counted into `skips`."""
    reasons = ds["skip"]
    for i, reason in enumerate(reasons):
        if reason:
            skips.add(f"{label}: {reason}", i + 1)
    return ds.select([i for i, reason in enumerate(reasons) if not reason])


def split_rows(rows: Sequence, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) row indices, both in data set order; eval chosen by `cfg.seed`."""
    n = len(rows)
    n_eval = held_out_count(n, cfg)
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def held_out_count(n: int, cfg: DataConfig) -> int:
    """How many of `n` rows are held out: `eval_size` (or `eval_fraction` of them), scaled down with a
    printed note to a tenth of the rows (at least 1) when that would leave under half for training
    (a recipe's hold-out of 64 rows on a user's 60-row file)."""
    asked = cfg.eval_size if cfg.eval_size is not None else round(cfg.eval_fraction * n)
    if asked <= n // 2 or n < 2:
        if asked >= n:
            raise UsageError(f"data.eval_size / eval_fraction hold out {asked} of {n} rows; "
                             "leave at least one row for training")
        return asked
    scaled = max(1, round(0.1 * n))
    key = f"data.eval_size={cfg.eval_size}" if cfg.eval_size is not None else f"data.eval_fraction={cfg.eval_fraction:g}"
    log.warning("note: %s would hold out %d of the %d usable rows; holding out %d (a tenth) instead so that most "
                "rows train; set data.eval_size to choose", key, asked, n, scaled)
    return scaled


def repeat(indices: list[int], weight: float, rng: random.Random) -> list[int]:
    """`indices` repeated `weight` times: whole copies, then a random round(frac x n) of them."""
    whole, frac = int(weight), weight - int(weight)
    return indices * whole + sorted(rng.sample(indices, round(frac * len(indices))))


def load_rows(cfg: DataConfig, records: list[dict] | None = None,
              eval_records: list[dict] | None = None) -> Rows:
    """Every data set read, checked and mixed; `records` / `eval_records` replace reading files."""
    import datasets

    if cfg.chat_template and is_template_file(cfg.chat_template):  # a name needs the tokenizer: checked later
        read_template_file(cfg.chat_template)
    if records is None:
        specs, given = data_sets(cfg), [None] * len(data_sets(cfg))
    else:
        specs, given = [DatasetSpec(path="<rows>", format=cfg.format, columns=cfg.columns)], [
            datasets.Dataset.from_list(records)]
    skips, parts, labels, read = Skips(), [], [], 0
    for i, (spec, ds) in enumerate(zip(specs, given)):
        rows, label = read_part(spec, i, cfg, ds, cfg.max_rows)
        read += len(rows)
        parts.append(_good(rows, skips, label))
        labels.append(label)
    _one_kind(parts, labels)
    if sum(len(p) for p in parts) == 0:
        reason, row = next(iter(skips.first.items()), ("no rows", 0))
        raise UsageError(f"no usable rows (e.g. {reason}, row {row})")
    if eval_records is not None or cfg.eval_dataset is not None:
        held, label = _eval_part(cfg, eval_records, len(specs))
        read += len(held)
        labels.append(label)
        _one_kind(parts + [held], labels)
        evals = _good(held, skips, label)
        train = datasets.concatenate_datasets(parts)
        return Rows(_mixed(train, specs, cfg.seed), evals, labels, read, skips, separate_eval=True)
    whole = datasets.concatenate_datasets(parts)
    train_idx, eval_idx = split_rows(whole, cfg)
    return Rows(_mixed(whole.select(train_idx), specs, cfg.seed), whole.select(eval_idx), labels, read, skips)


def _one_kind(parts: list, labels: list[str]) -> None:
    """All data sets of a mixture hold the same kind of rows (supervised or preference)."""
    kinds = {label: "preference" if "chosen" in part.column_names else "supervised" for part, label in zip(parts, labels)}
    if len(set(kinds.values())) > 1:
        raise UsageError(f"data.datasets mixes supervised and preference rows ({kinds}); a run trains one objective")


def _eval_part(cfg: DataConfig, eval_records: list[dict] | None, part: int):
    import datasets

    spec = DatasetSpec(path=cfg.eval_dataset or "<eval rows>", format=cfg.format, columns=cfg.columns,
                       split=cfg.split)
    ds = None if eval_records is None else datasets.Dataset.from_list(eval_records)
    return read_part(spec, part, cfg, ds)


def _mixed(train, specs: list[DatasetSpec], seed: int):
    """Training rows with each data set's rows repeated by its weight (identity when all are 1)."""
    if all(s.weight == 1 for s in specs):
        return train
    parts = train["part"]
    keep: list[int] = []
    for p, spec in enumerate(specs):
        mine = [i for i, q in enumerate(parts) if q == p]
        keep += repeat(mine, spec.weight, random.Random(seed * 1_000_003 + p))
    if not keep:
        raise UsageError("data.datasets: the weights leave no training rows; raise a weight")
    return train.select(keep)
