"""Training data: rows -> rendered text with trained character spans -> tokens and labels -> batches.

Every format renders a row to one string plus the character spans that carry loss:

- `alpaca` (instruction, optional input, output): the Stanford Alpaca prompt; the output is trained.
- `input-output` (input, output): input and output concatenated verbatim; the output is trained.
- `chat` (messages: [{role, content}, ...]): the tokenizer's own chat template. Assistant turn i
  spans from the end of `template(messages[:i], add_generation_prompt=True)` to the end of
  `template(messages[:i+1])` in the rendered whole conversation, so the assistant text and the
  template's end-of-turn tokens are trained and the role headers are not.
- `text` (text): everything is trained.

One tokenisation then serves all formats: the fast tokenizer's offset mapping says which characters
each token covers, and a token gets its id as label when it overlaps a trained span, else -100
(`train_on_prompt` labels every token). Labels are *unshifted* (label t is token t); the loss
shifts. An EOS is appended, and trained, when a row ends in a response whose tokens hold no EOS
(ChatML's `<|im_end|>` is the EOS, so chat templates that close turns with it get none extra).

Bad rows (missing column, empty or non-string text, text that is not valid Unicode, no response
token left after truncation) are *skipped and counted* by reason, with the first row index of each
reason in the stats and a warning; a data set whose columns cannot fit the format at all, or whose
rows are all bad, is a `UsageError`. Rows longer than `max_length` are truncated and counted.

Packing concatenates examples (each ending in EOS) into one stream cut into `max_length` blocks:
no padding, but documents in a block attend to each other (positions are not reset), and rows are
not truncated first. Length grouping instead sorts shuffled mega-batches by length so batches need
little padding while the batch order stays random.

Batches come from `qlora.batching` (the resumable sampler and the padding collate).
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch.utils.data import DataLoader

from qlora.batching import Example, ResumableBatchSampler, collate
from qlora.config import DataConfig
from qlora.errors import UsageError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {"chat": ("messages",), "alpaca": ("instruction", "output"),
                  "input-output": ("input", "output"), "text": ("text",)}  # auto tries in this order
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


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


class BadRow(Exception):
    """A row that cannot be used; the message is the skip reason (names the column)."""


# ----------------------------------------------------------------------------- sources


def chatterbot_rows(language: str = "english") -> list[dict[str, Any]]:
    """The chatterbot-corpus conversations as chat rows, files in sorted order.

    Each corpus conversation alternates user / assistant strings; a trailing user turn without an
    answer is dropped. Malformed conversations pass through unchanged as `messages`, so the row
    checks skip and count them like any other bad row.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")  # locate without importing its package code
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("data.dataset 'chatterbot' needs the chatterbot-corpus package: "
                         "pip install chatterbot-corpus==1.3.3 (or pip install 'qlora[embedded]')")
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
        if not path.is_file():
            raise UsageError(f"data file {source!r} does not exist")
        if builder is None:
            raise UsageError(f"data file {source!r}: unknown extension {path.suffix!r}; "
                             f"allowed: {', '.join(FILE_BUILDERS)}")
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


def detect_format(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    """Resolve `auto` from the columns present and check the columns fit the format."""
    columns = sorted({k for row in rows for k in row})
    candidates = list(FORMAT_COLUMNS) if fmt == "auto" else [fmt]
    for name in candidates:
        if all(c in columns for c in FORMAT_COLUMNS[name]):
            return name
    wanted = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMAT_COLUMNS.items() if n in candidates)
    raise UsageError(f"data.format {fmt!r}: the data set has columns {columns}, which fit no format "
                     f"(needed columns - {wanted})")


# ----------------------------------------------------------------------------- rendering


def _text(row: dict[str, Any], column: str, optional: bool = False) -> str:
    value = row.get(column)
    if value is None and optional:
        return ""
    if column not in row or value is None:
        raise BadRow(f"missing '{column}'")
    if not isinstance(value, str):
        raise BadRow(f"'{column}' is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"bad encoding in '{column}'") from None
    if not value.strip() and not optional:
        raise BadRow(f"empty '{column}'")
    return value


def _chat(messages: Any, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' is not a list of turns")
    for turn in messages:
        if not isinstance(turn, dict):
            raise BadRow("'messages' turn is not a {role, content} mapping")
        _text(turn, "role"), _text(turn, "content")
    if not any(t["role"] == "assistant" for t in messages):
        raise BadRow("'messages' has no assistant turn")

    def render(turns: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    turns = [{"role": t["role"], "content": t["content"]} for t in messages]
    text, spans = render(turns), []
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            prompt, done = render(turns[:i], generation_prompt=True), render(turns[: i + 1])
            if not (done.startswith(prompt) and text.startswith(done)):
                raise UsageError("the tokenizer's chat template does not render conversations prefix by "
                                 "prefix, so assistant turns cannot be located; set data.train_on_prompt=true")
            spans.append((len(prompt), len(done)))
    return text, spans


def render_row(row: dict[str, Any], fmt: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Text of a row and the sorted, disjoint character spans [start, end) that carry loss."""
    if fmt == "chat":
        if tokenizer.chat_template is None:
            raise UsageError("data.format 'chat' needs a tokenizer with a chat template; "
                             "this one has none (use format alpaca, input-output or text)")
        return _chat(row.get("messages"), tokenizer)
    if fmt == "text":
        text = _text(row, "text")
        return text, [(0, len(text))]
    output = _text(row, "output")
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
        template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
    else:
        prompt = _text(row, "input")
    return prompt + output, [(len(prompt), len(prompt) + len(output))]


# ----------------------------------------------------------------------------- tokenisation


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


def pack(examples: Sequence[Example], block: int) -> list[Example]:
    """Concatenate examples and cut the stream into `block`-token pieces (the last may be shorter)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i: i + block], "labels": labels[i: i + block]} for i in range(0, len(ids), block)]


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
