"""Checks of a local text data file before `datasets` reads it, naming the file and the 1-based line.

`datasets` reports a broken JSON line, invalid UTF-8, a NUL byte or a ragged CSV row as "An error
occurred while generating the dataset" (the row appears only in a log line, counted from 0), and an
empty file or a folder with a misleading message. Reading the text once here costs little next to
tokenising it and turns each of those into a `UsageError` a user can act on. Parquet is binary and
left to pyarrow, whose messages name the problem.
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
        return
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
    except ValueError:
        return False
    return True


def _first_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip())


def _check_json_document(path: Path, text: str) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"data file {str(path)!r} line {err.lineno}: not valid JSON ({err.msg}, "
                         f"column {err.colno})") from None


def _check_json_lines(path: Path, text: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UsageError(f"data file {str(path)!r} line {number}: not valid JSON ({err.args[0]})") from None
        if not isinstance(row, dict):
            raise UsageError(f"data file {str(path)!r} line {number}: a row must be a JSON object, "
                             f"got {type(row).__name__}")


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
