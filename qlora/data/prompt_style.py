"""How a run's prompts look, so that samples and `qlora generate` ask the model as training did.

Training renders each row by its format (`qlora.data.formats`): conversations through the chat
template, Alpaca rows through the Stanford Alpaca prompt, input-output / prompt-completion / text
rows as their raw text. A model tuned on raw `input` + `output` text has never seen a chat
header, so a chat-templated question gets an answer in no format it learnt (`1.1.1.1...`).

The style is one of

    chat     the tokenizer's chat template, ending in the assistant header
    alpaca   ALPACA_PROMPT with the question as the instruction
    raw      the question as it is (input-output, prompt-completion, text)

read off the training rows (`style_of_rows`), written as `prompt_format.json` into every adapter
folder the run writes (final, `best/`, checkpoints) and carried into merged and 4-bit folders, and
read back by `qlora generate` (`read_style`). Folders written before it existed read as `chat`.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

STYLE_FILE = "prompt_format.json"
STYLES = ("chat", "alpaca", "raw")
_ALPACA_HEADS = (ALPACA_PROMPT.split("\n\n")[0], ALPACA_PROMPT_INPUT.split("\n\n")[0])


def style_of_row(row: dict) -> str:
    """The style of one canonical row (`qlora.data.formats.canonical`)."""
    if row.get("messages"):
        return "chat"
    return "alpaca" if str(row.get("prompt", "")).startswith(_ALPACA_HEADS) else "raw"


def style_of_rows(rows) -> str:
    """The style of a run's training rows (`qlora.data.rows.Rows`): that of most of the first 64."""
    sample = [style_of_row(row) for row in rows.train.select(range(min(64, len(rows.train))))]
    return max(STYLES, key=sample.count) if sample else "chat"


def alpaca_prompt(question: str) -> str:
    return ALPACA_PROMPT.format(instruction=question)


def save_style(folder: str | Path, style: str) -> None:
    """Write `prompt_format.json` into `folder` (a temporary folder being built: a plain write)."""
    (Path(folder) / STYLE_FILE).write_text(json.dumps({"style": style}) + "\n", encoding="utf-8")


def read_style(*folders: str | Path | None) -> str | None:
    """The style saved in the first of `folders` that holds one (None when none does)."""
    for folder in folders:
        path = Path(folder) / STYLE_FILE if folder else None
        if path is not None and path.is_file():
            try:
                style = json.loads(path.read_text(encoding="utf-8")).get("style")
            except (ValueError, AttributeError):
                style = None
            if style in STYLES:
                return style
    return None
