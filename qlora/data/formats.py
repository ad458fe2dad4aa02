"""Row formats: which columns a row has, and how it renders to one string plus the character spans
that carry loss.

- `alpaca` (instruction, optional input, output): the Stanford Alpaca prompt; the output is trained.
- `input-output` (input, output): input and output concatenated verbatim; the output is trained.
- `chat` (messages: [{role, content}, ...]): the tokenizer's own chat template. Assistant turn i
  spans from the end of `template(messages[:i], add_generation_prompt=True)` to the end of
  `template(messages[:i+1])` in the rendered whole conversation, so the assistant text and the
  template's end-of-turn tokens are trained and the role headers are not.
- `text` (text): everything is trained.

A row that cannot be used raises `BadRow` (the caller skips and counts it); `prompt_of` gives the
prompt part of a row of any format (for sample generations).
"""

from __future__ import annotations

from typing import Any, Sequence

from qlora.errors import UsageError

FORMAT_COLUMNS = {"chat": ("messages",), "alpaca": ("instruction", "output"),
                  "input-output": ("input", "output"), "text": ("text",)}  # auto tries in this order
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know


class BadRow(Exception):
    """A row that cannot be used; the message is the skip reason (names the column)."""


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
        if turn["role"] not in CHAT_ROLES:
            raise BadRow(f"'messages' role {turn['role']!r} is not one of {', '.join(CHAT_ROLES)}")
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


def prompt_of(row: dict[str, Any]) -> str | None:
    """The prompt part of a row of any supported format (None when it has none): the first user
    turn of a chat, else the instruction, input or prompt column."""
    if isinstance(row.get("messages"), list):
        turns = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return turns[0] if turns and isinstance(turns[0], str) else None
    for key in ("instruction", "input", "prompt"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    return None
