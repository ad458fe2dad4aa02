"""Training data: rows -> rendered text with trained character spans -> tokens and labels -> batches.

    sources (where rows come from) -> formats (row -> text + trained spans) -> tokenize (tokens,
    labels, stats) -> batching (packing, the resumable sampler, padding) -> loaders (here)


Here: the train / held-out split (deterministic, by `data.seed`), and the two DataLoaders.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from qlora.config import DataConfig
from qlora.data.batching import ResumableBatchSampler, collate, pack
from qlora.data.formats import detect_format
from qlora.data.sources import load_records
from qlora.data.tokenize import DataStats, tokenize_rows
from qlora.errors import UsageError

log = logging.getLogger(__name__)


def split_rows(rows: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) row indices, both in data set order; eval chosen by `cfg.seed`."""
    n = len(rows)
    n_eval = cfg.eval_size if cfg.eval_size is not None else round(cfg.eval_fraction * n)
    if n_eval >= n:
        raise UsageError(f"data.eval_size / eval_fraction hold out {n_eval} of {n} rows; "
                         "leave at least one row for training")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


def split_sources(cfg: DataConfig, records: list[dict[str, Any]] | None = None,
                  eval_records: list[dict[str, Any]] | None = None):
    """(train indices, train rows, eval indices, eval rows): `cfg.max_rows` of the data set, then
    either the separate eval data (`eval_records` / `cfg.eval_dataset`) or the held-out split."""
    rows = records if records is not None else load_records(cfg.dataset, cfg.split)
    rows = rows[: cfg.max_rows] if cfg.max_rows else rows
    if eval_records is None and cfg.eval_dataset is not None:
        eval_records = load_records(cfg.eval_dataset, cfg.split)
    if eval_records is not None:
        return range(len(rows)), rows, range(len(eval_records)), eval_records
    train_idx, eval_idx = split_rows(rows, cfg)
    return train_idx, [rows[i] for i in train_idx], eval_idx, [rows[i] for i in eval_idx]


def make_dataloaders(tokenizer, cfg: DataConfig, micro_batch_size: int, seed: int, *,
                     records: list[dict[str, Any]] | None = None,
                     eval_records: list[dict[str, Any]] | None = None,
                     rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader | None, DataStats]:
    """Train and eval loaders (eval is None when nothing is held out) and the pipeline's stats.

    `records` / `eval_records` replace loading `cfg.dataset` / `cfg.eval_dataset` (in-memory data).
    The train loader's `batch_sampler` is a `ResumableBatchSampler` seeded with `seed`; save and
    restore its `state_dict()` for an exact resume. Eval batches are in order, split across ranks.
    """
    train_idx, train_rows, eval_idx, eval_rows = split_sources(cfg, records, eval_records)
    eval_where = "" if eval_records is None and cfg.eval_dataset is None else "eval data: "
    if not train_rows:
        raise UsageError(f"data.dataset {cfg.dataset!r} has no rows")
    fmt = detect_format(train_rows + eval_rows, cfg.format)
    stats = DataStats(rows=len(train_rows) + len(eval_rows))
    train = tokenize_rows(train_rows, tokenizer, fmt, cfg, stats, train_idx)
    evals = tokenize_rows(eval_rows, tokenizer, fmt, cfg, stats, eval_idx, where=eval_where)
    if stats.skipped:
        log.warning("data: %d rows, %s", stats.rows, stats.skipped_summary())
    if not train:
        reason, row = next(iter(stats.first_skipped.items()), ("no rows", 0))
        raise UsageError(f"data.dataset {cfg.dataset!r}: no usable training rows as format {fmt!r} "
                         f"(e.g. row {row}: {reason})")
    stats.train_target_tokens = sum(sum(t != -100 for t in ex["labels"][1:]) for ex in train)
    if cfg.packing:
        train, evals = pack(train, cfg.max_length), pack(evals, cfg.max_length)
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    stats.train_tokens = sum(len(ex["input_ids"]) for ex in train)
    stats.eval_tokens = sum(len(ex["input_ids"]) for ex in evals)

    collate_fn = functools.partial(collate, pad_id=_pad_id(tokenizer))
    sampler = ResumableBatchSampler([len(ex["input_ids"]) for ex in train], micro_batch_size,
                                    group_by_length=cfg.group_by_length, seed=seed, rank=rank,
                                    world_size=world_size)
    if len(sampler) == 0:
        raise UsageError(f"{len(train)} training examples make fewer micro-batches than the "
                         f"{world_size} processes")
    # Own generators: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
    # which would shift the dropout masks of a resumed run (it creates its iterator at a new point).
    train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0,
                              generator=torch.Generator().manual_seed(seed))
    eval_loader = None
    if evals:
        eval_sampler = ResumableBatchSampler([len(ex["input_ids"]) for ex in evals], micro_batch_size,
                                             shuffle=False, rank=rank, world_size=world_size, drop_uneven=False)
        eval_loader = DataLoader(evals, batch_sampler=eval_sampler, collate_fn=collate_fn, num_workers=0,
                                 generator=torch.Generator().manual_seed(seed))
    return train_loader, eval_loader, stats
