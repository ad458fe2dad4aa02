"""Tokenising rendered rows: one tokenisation serves all formats.

The fast tokenizer's offset mapping says which characters each token covers, and a token gets its
id as label when it overlaps a trained span, else -100 (`train_on_prompt` labels every token).
Labels are *unshifted* (label t is token t); the loss shifts. An EOS is appended, and trained, when
a row ends in a response whose tokens hold no EOS (ChatML's `<|im_end|>` is the EOS, so chat
templates that close turns with it get none extra).

Bad rows (missing column, empty or non-string text, text that is not valid Unicode, no response
token left after truncation) are *skipped and counted* by reason in `DataStats`, with the first
row index of each reason. Rows longer than `max_length` are truncated and counted.

Packing (`qlora.data.batching.pack`) concatenates examples (each ending in EOS) into one stream cut
into `max_length` blocks: no padding, no truncation, and no attention across documents (positions
restart at each document).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from qlora.config import DataConfig
from qlora.data.batching import Example
from qlora.data.formats import BadRow, render_row
from qlora.errors import UsageError


@dataclass
class DataStats:
    """What the data pipeline kept and dropped (counts over train and eval together)."""

    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    first_skipped: dict[str, int] = field(default_factory=dict)  # reason -> first row index
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


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer, fmt: str, cfg: DataConfig, stats: DataStats,
                  row_ids: Sequence[int] | None = None, where: str = "", batch_size: int = 512) -> list[Example]:
    """Render, tokenise and label rows; bad rows are skipped into `stats` under their `row_ids`
    (default 0, 1, ...) with `where` prefixed to the reason."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("the data pipeline needs a fast (tokenizers-backed) tokenizer for offset mappings")
    row_ids = range(len(rows)) if row_ids is None else row_ids
    examples: list[Example] = []
    for start in range(0, len(rows), batch_size):
        rendered = []
        for i, row in zip(row_ids[start: start + batch_size], rows[start: start + batch_size]):
            try:
                rendered.append((i, *render_row(row, fmt, tokenizer)))
            except BadRow as e:
                stats.skip(where + str(e), i)
        if not rendered:
            continue
        enc = tokenizer([text for _, text, _ in rendered], add_special_tokens=fmt != "chat",
                        return_offsets_mapping=True)
        for (i, text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            labels = list(ids) if cfg.train_on_prompt else _labels(ids, offsets, spans)
            ids = list(ids)
            _add_eos(ids, labels, offsets, spans, text, tokenizer.eos_token_id)
            if len(ids) > cfg.max_length and not cfg.packing:
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
                stats.truncated += 1
            if all(label == -100 for label in labels[1:]):  # label 0 is never predicted
                stats.skip(where + "no response token within max_length", i)
                continue
            examples.append({"input_ids": ids, "labels": labels})
    return examples

