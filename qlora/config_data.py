"""The recipe's `data` section: which data sets, in which format, how they are cut and mixed.

Kept beside `qlora.config` (which re-exports `DataConfig` and `DatasetSpec`) so each stays small.
`data.datasets` entries are checked here, each as a `DatasetSpec` with its index in every message,
and kept as plain mappings, so a saved recipe reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from qlora import choices
from qlora.errors import UsageError
from qlora.typecheck import Section

MAX_LENGTH = 1 << 20  # tokens per example: far beyond any real run, low enough to catch a typo
MAX_PROCS = 4096  # datasets.map processes

DataFormat = Literal[choices.DATA_FORMATS]


@dataclass
class DatasetSpec(Section):
    """One entry of `data.datasets`: a data set and its share of the mixture. Keys left unset take
    the `data.` value of the same name (`format`, `columns`, `split`)."""

    section: ClassVar[str] = "data.datasets"

    path: str = ""
    """`chatterbot`, a local .json/.jsonl/.csv/.parquet file, a `datasets.save_to_disk` folder, a
    folder of data files, or a hub data set id (only when the hub is reachable)."""
    weight: float = 1.0
    """Repeat factor per epoch: round(weight x rows) of this set's training rows each epoch (2.0:
    every row twice; 0.5: a random half, drawn with data.seed). Held-out rows are not repeated."""
    format: Optional[DataFormat] = None
    """Row layout of this set (null: data.format)."""
    columns: Optional[dict[str, str]] = None
    """The format's column names -> this set's (null: data.columns)."""
    name: Optional[str] = None
    """Subset / config name of a hub data set (`datasets.load_dataset(path, name)`)."""
    data_files: Union[str, list[str], None] = None
    """Which files of a hub data set or data folder to read (`load_dataset(..., data_files=)`)."""
    split: Optional[str] = None
    """Split of a hub data set or save_to_disk folder (null: data.split)."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(bool(self.path.strip()), "path", "give a file, folder or data set name")
        self._require(self.weight > 0, "weight", "expected a number > 0 (a repeat factor per epoch)")


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"

    dataset: str = "chatterbot"
    """`chatterbot` (built-in English conversations of the chatterbot-corpus package),
    `chatterbot-pairs` (preference pairs built from them: qlora.data.pairs), a local
    .json/.jsonl/.csv/.parquet file, a `datasets.save_to_disk` folder, a folder of data files, or a
    hub data set id (only when the hub is reachable). Ignored when `datasets` is set."""
    datasets: Optional[list[dict]] = None
    """A mixture instead of `dataset`: a list of {path, weight, format, columns, name, data_files,
    split}. `weight` is a repeat factor per epoch (2.0: every row twice; 0.5: a seeded random half);
    the other keys default to the `data.` keys of the same name. Eval rows are held out from all
    data sets together, before repeating."""
    name: Optional[str] = None
    """Subset / config name of a hub `dataset`."""
    data_files: Union[str, list[str], None] = None
    """Files of a hub `dataset` or data folder to read (`datasets.load_dataset(data_files=)`)."""
    format: DataFormat = "auto"
    """Row layout: alpaca (instruction/input/output), input-output (input/output),
    prompt-completion (TRL's prompt/completion: strings, or lists of {role, content} turns), chat
    (messages: a list of {role, content}), sharegpt (conversations: a list of {from, value}), text
    (text). `auto` picks by the columns present."""
    columns: dict[str, str] = field(default_factory=dict)
    """The format's column names -> the data set's, e.g. {input: question, output: answer}."""
    chat_template: Optional[str] = None
    """Chat template for chat / sharegpt / conversational rows: a template name the tokenizer
    ships (its named templates, `default` being its own) or `chatml`, or a path to a .jinja file.
    Saved with the adapter (and merged models), so generation uses it too. null: the tokenizer's."""
    split: str = "train"
    """Split to read from a hub data set or save_to_disk folder (local files form one `train` split)."""
    eval_dataset: Optional[str] = None
    """A separate file / name for evaluation; when set, eval_fraction and eval_size are ignored."""
    max_length: int = 256
    """Tokens per example; longer examples are truncated (and counted)."""
    train_on_prompt: bool = False
    """Also train on prompt / user tokens. Off: only responses (assistant turns) carry labels."""
    packing: bool = False
    """Concatenate examples and cut them into max_length blocks (no padding waste). Documents in a
    block do not attend to each other: positions restart per document (qlora.data.batching.pack)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); batch order stays random."""
    eval_fraction: float = 0.05
    """Fraction of rows held out for evaluation, in [0, 1)."""
    eval_size: Optional[int] = None
    """Number of rows held out for evaluation; overrides eval_fraction when set."""
    seed: int = 42
    """Seed of the train / eval split and of the mixture's fractional repeats."""
    max_rows: Optional[int] = None
    """Use only the first max_rows rows of each data set (before the split)."""
    num_proc: Optional[int] = None
    """Processes for `datasets.map` (checking and tokenising rows); null: the main process only."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(bool(self.dataset.strip()), "dataset", "give a file path or a data set name")
        self._require(self.datasets is None or bool(self.datasets), "datasets",
                      "expected a non-empty list of {path, weight, ...} or null")
        self.datasets = None if self.datasets is None else [
            dataclasses.asdict(_dataset_spec(i, entry)) for i, entry in enumerate(self.datasets)]
        self._require_range("max_length", 2, MAX_LENGTH)
        self._require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "expected a number in [0, 1)")
        self._require(self.eval_size is None or self.eval_size >= 0, "eval_size", "expected an int >= 0")
        self._require(self.max_rows is None or self.max_rows > 0, "max_rows", "expected an int > 0")
        self._require_range("num_proc", 1, MAX_PROCS)
        self._require_range("seed", 0, 2**32 - 1, "numpy's seed range")
        self._require(not (self.packing and self.group_by_length), "packing",
                      "packing and group_by_length exclude each other (packed blocks all have max_length)")


def _dataset_spec(index: int, entry: object) -> DatasetSpec:
    """`data.datasets[index]` checked, with the index in every message."""
    where = f"data.datasets[{index}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: {entry!r} is not allowed; expected a mapping with a `path` (and weight, "
                         "format, columns, name, data_files, split)")
    keys = [f.name for f in dataclasses.fields(DatasetSpec)]
    for key in entry:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(keys)}")
    if "path" not in entry:
        raise UsageError(f"{where}: no `path`; give a file, folder or data set name")
    try:
        return DatasetSpec(**entry)
    except UsageError as err:
        raise UsageError(str(err).replace("data.datasets.", f"{where}.", 1)) from None
