"""Training data: rows -> checked canonical rows -> tokens and labels -> batches.

    sources (where rows come from) -> formats (row -> canonical row, bad rows) -> rows (read, check,
    split and mix every data set; no torch) -> tokenize (tokens, labels, stats)
    -> batching (packing, the resumable sampler, padding) -> loaders (here)

Here: the two DataLoaders over the tokenised rows, and the statistics of what was kept.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from qlora.config import DataConfig
from qlora.data.batching import ResumableBatchSampler, collate, pack
from qlora.data.formats import portable
from qlora.data.rows import Rows, load_rows
from qlora.data.tokenize import DataStats, tokenize_dataset
from qlora.errors import UsageError

log = logging.getLogger(__name__)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


def split_sources(cfg: DataConfig, records: list[dict[str, Any]] | None = None,
                  eval_records: list[dict[str, Any]] | None = None) -> tuple[range, list, range, list]:
    """(train indices, train rows, eval indices, eval rows): the checked rows as chat or
    prompt-completion rows (`portable`), training rows repeated by their data set's weight."""
    rows = load_rows(cfg, records, eval_records)
    train, evals = [portable(r) for r in rows.train], [portable(r) for r in rows.eval]
    return range(len(train)), train, range(len(evals)), evals


def _examples(rows: Rows, which: str, tokenizer, cfg: DataConfig, stats: DataStats):
    """Tokenised training or eval rows (a Dataset of input_ids / labels), skips and truncation counted."""
    ds = tokenize_dataset(getattr(rows, which), tokenizer, cfg, what=f"{which} rows")
    if len(ds) == 0:
        return ds, 0
    where = "eval data: " if which == "eval" and rows.separate_eval else ""
    reasons = ds["skip"]
    for reason, part, row in zip(reasons, ds["part"], ds["row"]):
        if reason:
            stats.skip(f"{where}{rows.labels[part]}: {reason}", row)
    stats.truncated += sum(ds["truncated"])
    ds = ds.select([i for i, reason in enumerate(reasons) if not reason])
    return ds.select_columns(["input_ids", "labels", "length"]), sum(ds["n_targets"])


def make_dataloaders(tokenizer, cfg: DataConfig, micro_batch_size: int, seed: int, *,
                     records: list[dict[str, Any]] | None = None,
                     eval_records: list[dict[str, Any]] | None = None, rows: Rows | None = None,
                     rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader | None, DataStats]:
    """Train and eval loaders (eval is None when nothing is held out) and the pipeline's stats.

    `rows` are the checked rows when the caller read them already (`qlora.data.rows.load_rows`);
    `records` / `eval_records` replace reading the data sets (in-memory data). The train loader's
    `batch_sampler` is a `ResumableBatchSampler` seeded with `seed`; save and restore its
    `state_dict()` for an exact resume. Eval batches are in order, split across ranks.
    """
    rows = rows if rows is not None else load_rows(cfg, records, eval_records)
    stats = DataStats(rows=rows.rows)
    for reason, n in rows.skips.counts.items():
        stats.skipped[reason] += n
        stats.first_skipped.setdefault(reason, rows.skips.first[reason])
    train, stats.train_target_tokens = _examples(rows, "train", tokenizer, cfg, stats)
    evals, _ = _examples(rows, "eval", tokenizer, cfg, stats)
    if stats.skipped:  # the callers print the summary (train's `data:` line, eval's held-out line)
        log.info("data: %d rows, %s", stats.rows, stats.skipped_summary())
    if len(train) == 0:
        reason, row = next(iter(stats.first_skipped.items()), ("no rows", 0))
        raise UsageError(f"no usable training rows (e.g. {reason}, row {row})")
    lengths, eval_lengths = train["length"], evals["length"] if len(evals) else []
    train, evals = train.remove_columns("length"), evals.remove_columns("length") if len(evals) else []
    if cfg.packing:
        train, evals = pack(train, cfg.max_length), pack(evals, cfg.max_length)
        lengths, eval_lengths = [len(ex["input_ids"]) for ex in train], [len(ex["input_ids"]) for ex in evals]
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    stats.train_tokens, stats.eval_tokens = sum(lengths), sum(eval_lengths)

    collate_fn = functools.partial(collate, pad_id=_pad_id(tokenizer))
    sampler = ResumableBatchSampler(lengths, micro_batch_size, group_by_length=cfg.group_by_length, seed=seed,
                                    rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise UsageError(f"{len(train)} training examples make fewer micro-batches than the "
                         f"{world_size} processes")
    # Own generators: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
    # which would shift the dropout masks of a resumed run (it creates its iterator at a new point).
    train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0,
                              generator=torch.Generator().manual_seed(seed))
    eval_loader = None
    if len(evals):
        eval_sampler = ResumableBatchSampler(eval_lengths, micro_batch_size, shuffle=False, rank=rank,
                                             world_size=world_size, drop_uneven=False)
        eval_loader = DataLoader(evals, batch_sampler=eval_sampler, collate_fn=collate_fn, num_workers=0,
                                 generator=torch.Generator().manual_seed(seed))
    return train_loader, eval_loader, stats
