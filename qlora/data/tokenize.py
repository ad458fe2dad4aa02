"""Tokenising rendered rows: one tokenisation serves all formats.

The fast tokenizer's offset mapping says which characters each token covers, and a token gets its
id as label when it overlaps a trained span, else -100 (`train_on_prompt` labels every token).
Labels are *unshifted* (label t is token t); the loss shifts. An EOS is appended, and trained, when
a row ends in a response whose tokens hold no EOS (ChatML's `<|im_end|>` is the EOS, so chat
templates that close turns with it get none extra).

Rows arrive checked and canonical (`qlora.data.rows`); a row with no response token left after
truncation is *skipped and counted* in `DataStats`, with its data set and first row. Rows longer
than `max_length` are truncated and counted. `tokenize_dataset` does this as a cached
`Dataset.map`; `tokenize_rows` does the same for a list of rows in memory.

Packing (`qlora.data.batching.pack`) concatenates examples (each ending in EOS) into one stream cut
into `max_length` blocks: no padding, no truncation, and no attention across documents (positions
restart at each document).
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from qlora.config import DataConfig
from qlora.data.batching import Example
from qlora.data.formats import BadRow, RowError, canonical, render_row
from qlora.errors import UsageError


@dataclass
class DataStats:
    """What the data pipeline kept and dropped (counts over train and eval together)."""

    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason (naming the data set) -> rows
    first_skipped: dict[str, int] = field(default_factory=dict)  # reason -> first row (1-based)
    truncated: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    eval_tokens: int = 0
    train_target_tokens: int = 0  # tokens with a label (before packing; a block's first token drops)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, row)

    def skipped_summary(self) -> str:
        reasons = "; ".join(f"{n} x {r} (first: row {self.first_skipped[r]})" for r, n in self.skipped.items())
        return f"{sum(self.skipped.values())} skipped{': ' + reasons if reasons else ''}"

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.skipped_summary()}, "
                f"{self.truncated} truncated; train {self.train_examples} examples / {self.train_tokens} "
                f"tokens ({self.train_target_tokens} trained); eval {self.eval_examples} examples / "
                f"{self.eval_tokens} tokens")


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained when its characters overlap a span (special tokens cover none)."""
    starts = [s for s, _ in spans]
    labels = []
    for token, (lo, hi) in zip(ids, offsets):
        k = bisect.bisect_right(starts, hi - 1) - 1  # last span starting inside or before the token
        trained = hi > lo and k >= 0 and spans[k][1] > lo
        labels.append(token if trained else -100)
    return labels


def _add_eos(ids: list[int], labels: list[int], offsets, spans, text: str, eos: int | None) -> None:
    """Close a row that ends in a trained response with a trained EOS (unless it has one)."""
    if eos is None or not spans or spans[-1][1] < len(text.rstrip()):
        return
    if ids and ids[-1] == eos:  # the tokenizer's post-processor added it
        labels[-1] = eos
        return
    last = [t for t, (lo, hi) in zip(ids, offsets) if hi > spans[-1][0] and lo < spans[-1][1]]
    if eos not in last:
        ids.append(eos)
        labels.append(eos)


def _tokenize_batch(batch: dict[str, list], *, tokenizer, max_length: int, train_on_prompt: bool,
                    packing: bool) -> dict[str, list]:
    """`Dataset.map` body: canonical rows (column lists) -> input_ids, labels, skip, truncated,
    length and n_targets (labelled positions after the first, which is never predicted)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {k: [None] * len(rows) for k in ("input_ids", "labels", "skip", "truncated",
                                                            "length", "n_targets")}
    for chat in (True, False):  # a chat template adds its own special tokens; plain text gets the tokenizer's
        group = [i for i, row in enumerate(rows) if bool(row["messages"]) == chat]
        if not group:
            continue
        rendered = [render_row(rows[i], tokenizer) for i in group]
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=not chat, return_offsets_mapping=True)
        for i, (text, spans), ids, offsets in zip(group, rendered, enc["input_ids"], enc["offset_mapping"]):
            ids = list(ids)
            labels = list(ids) if train_on_prompt else _labels(ids, offsets, spans)
            _add_eos(ids, labels, offsets, spans, text, tokenizer.eos_token_id)
            truncated = len(ids) > max_length and not packing
            if truncated:
                ids, labels = ids[:max_length], labels[:max_length]
            n_targets = sum(label != -100 for label in labels[1:])
            out["input_ids"][i], out["labels"][i], out["truncated"][i] = ids, labels, truncated
            out["length"][i], out["n_targets"][i] = len(ids), n_targets
            out["skip"][i] = "" if n_targets else "no response token within max_length"
    return out


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("the data pipeline needs a fast (tokenizers-backed) tokenizer for offset mappings")


def tokenize_dataset(ds, tokenizer, cfg: DataConfig, what: str = "rows"):
    """Canonical rows (a `datasets.Dataset`) tokenised by `Dataset.map`: cached by datasets for
    file-backed data (the tokenizer and settings are part of the fingerprint), `data.num_proc`
    processes when set. Columns: input_ids, labels, skip, truncated, length, n_targets, part, row."""
    _check_tokenizer(tokenizer)
    if len(ds) == 0:
        return ds
    procs = min(cfg.num_proc, len(ds)) if cfg.num_proc and len(ds) > 1 else None
    body = functools.partial(_tokenize_batch, tokenizer=tokenizer, max_length=cfg.max_length,
                             train_on_prompt=cfg.train_on_prompt, packing=cfg.packing)
    drop = [c for c in ds.column_names if c not in ("part", "row")]
    return ds.map(body, batched=True, batch_size=512, remove_columns=drop, num_proc=procs,
                  desc=f"tokenising {what}")


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer, fmt: str, cfg: DataConfig,
                  stats: DataStats) -> list[Example]:
    """Rows of format `fmt` (a list, in memory) checked, rendered, tokenised and labelled; skips go
    into `stats` under their 1-based row, a wrong-typed row is a UsageError naming it."""
    _check_tokenizer(tokenizer)
    kept, numbers = [], []
    for number, row in enumerate(rows, start=1):
        try:
            kept.append(canonical(row, fmt))
            numbers.append(number)
        except BadRow as skip:
            stats.skip(str(skip), number)
        except RowError as err:
            raise UsageError(f"row {number}: {err}") from None
    if not kept:
        return []
    columns = {k: [row[k] for row in kept] for k in kept[0]}
    out = _tokenize_batch(columns, tokenizer=tokenizer, max_length=cfg.max_length,
                          train_on_prompt=cfg.train_on_prompt, packing=cfg.packing)
    examples = []
    for j, number in enumerate(numbers):
        stats.truncated += out["truncated"][j]
        if out["skip"][j]:
            stats.skip(out["skip"][j], number)
        else:
            examples.append({"input_ids": out["input_ids"][j], "labels": out["labels"][j]})
    return examples

