"""Checks of a local text data file before `datasets` reads it, naming the file and the 1-based line.

`datasets` reports a broken JSON line, invalid UTF-8, a NUL byte or a ragged CSV row as "An error
occurred while generating the dataset" (the row appears only in a log line, counted from 0), and an
empty file or a folder with a misleading message. Reading the text once here costs little next to
tokenising it and turns each of those into a `UsageError` a user can act on. Parquet is binary and
left to pyarrow, whose messages name the problem.

JSON rows are also checked for columns whose kind changes from row to row (text in one row, a
number or a list in another): pyarrow cannot put both in one column and fails without naming the
row. Integers and floats mix freely; null is allowed anywhere (a missing value).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from qlora.errors import UsageError


def check_data_file(path: Path, builder: str) -> None:
    """Raise a UsageError naming `path` and the line of the first problem, if any."""
    if path.is_dir():
        raise UsageError(f"data file {str(path)!r} is a folder; give a .json/.jsonl/.csv/.parquet file")
    if builder == "parquet":
        return
    text = _text(path)
    if not text.strip():
        raise UsageError(f"data file {str(path)!r} is empty")
    if builder == "csv":
        _check_csv(path, text)
    elif path.suffix.lower() == ".jsonl":
        _check_json_lines(path, text)
    elif _parses(text):  # a .json file is one document ...
        _check_json_document(path, text)
    elif _parses(_first_line(text)):  # ... or JSON Lines
        _check_json_lines(path, text)
    else:
        _check_json_document(path, text)


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(f"data file {str(path)!r} line {line}: invalid UTF-8 (byte {data[err.start]:#04x}); "
                         "save the file as UTF-8") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise UsageError(f"data file {str(path)!r} line {line}: a NUL byte; text data files cannot hold one")
    return text


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except RecursionError:
        return True  # JSON, too deeply nested to read: the checks below name it
    except ValueError:
        return False
    return True


def _too_deep(path: Path, where: str) -> UsageError:
    return UsageError(f"data file {str(path)!r} {where}: JSON nested too deeply to read (past Python's "
                      "recursion limit); a row needs a few levels of lists and objects at most")


def _first_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip())


def _check_json_document(path: Path, text: str) -> None:
    try:
        document = json.loads(text)
    except RecursionError:
        raise _too_deep(path, "(one JSON document)") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"data file {str(path)!r} line {err.lineno}: not valid JSON ({err.msg}, "
                         f"column {err.colno})") from None
    if isinstance(document, list):
        kinds: dict[str, tuple[str, str]] = {}
        for number, row in enumerate(document, start=1):
            if not isinstance(row, dict):
                raise UsageError(f"data file {str(path)!r} row {number}: a row must be a JSON object, "
                                 f"got {type(row).__name__}")
            _check_kinds(path, f"row {number}", row, kinds)


KINDS = {str: "text", int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}


def _check_kinds(path: Path, where: str, row: dict, kinds: dict[str, tuple[str, str]]) -> None:
    """Every column keeps the kind of value it first had (`kinds`: column -> (kind, where))."""
    for column, value in row.items():
        if value is None:
            continue
        kind = KINDS[type(value)]
        first = kinds.setdefault(column, (kind, where))
        if first[0] != kind:
            raise UsageError(f"data file {str(path)!r} {where}: column {column!r} is {kind}, but {first[0]} "
                             f"in {first[1]}; a column holds one kind of value")


def _check_json_lines(path: Path, text: str) -> None:
    kinds: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise _too_deep(path, f"line {number}") from None
        except ValueError as err:
            raise UsageError(f"data file {str(path)!r} line {number}: not valid JSON ({err.args[0]})") from None
        if not isinstance(row, dict):
            raise UsageError(f"data file {str(path)!r} line {number}: a row must be a JSON object, "
                             f"got {type(row).__name__}")
        _check_kinds(path, f"line {number}", row, kinds)


def _check_csv(path: Path, text: str) -> None:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        for row in reader:
            if row and len(row) != len(header):
                raise UsageError(f"data file {str(path)!r} line {reader.line_num}: {len(row)} fields, "
                                 f"the header has {len(header)}")
    except csv.Error as err:
        raise UsageError(f"data file {str(path)!r} line {reader.line_num}: {err}") from None
