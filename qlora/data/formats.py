"""Row formats: which columns a row has, and how it becomes one canonical row.

Every format reduces to one of two canonical shapes, which is all the tokeniser knows:
- a conversation, `messages: [{role, content}, ...]`, rendered with the tokenizer's chat template
  (`data.chat_template` may replace it); the assistant turns are trained;
- a `prompt` and a `completion` concatenated verbatim; the completion is trained.

| format            | columns                               | canonical                                      |
|-------------------|---------------------------------------|------------------------------------------------|
| chat              | messages: [{role, content}]           | messages                                       |
| sharegpt          | conversations: [{from, value}]        | messages (human -> user, gpt -> assistant)     |
| prompt-completion | prompt, completion (TRL): strings ... | prompt + completion                            |
|                   | ... or lists of {role, content} turns | messages = prompt turns + completion turns     |
| alpaca            | instruction, optional input, output   | Stanford Alpaca prompt + output                |
| input-output      | input, output                         | input + output                                 |
| text              | text                                  | "" + text (everything trained)                 |

A canonical row is itself a valid chat or prompt-completion row (`portable`), so split data can
be written back out and read again. `query` keeps the bare question (instruction, input, prompt or
first user turn) for sample generations.

Bad rows, decided per case:
- an *error* (`RowError`, reported with the file and row, exit 2): a value of the wrong type (a
  number where text belongs, `messages` that is not a list, a turn that is not a mapping), an
  unknown role, text that is not valid Unicode. These are mistakes in how the file was made and
  would otherwise drop rows silently.
- a *counted skip* (`BadRow`, printed with the first row at the start): a missing (null) or empty
  value, a conversation with no assistant turn. Real data sets have a few of these.
"""

from __future__ import annotations

from typing import Any, Sequence

from qlora.errors import UsageError

FORMAT_COLUMNS = {"preference": ("chosen", "rejected"), "unpaired-preference": ("prompt", "completion", "label"),
                  "chat": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                  "prompt-completion": ("prompt", "completion"), "input-output": ("input", "output"),
                  "text": ("text",)}  # auto tries in this order
OPTIONAL_COLUMNS = {"alpaca": ("input",), "preference": ("prompt",)}  # preference rows: qlora.data.preference_rows
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant", "tool": "tool"}


class BadRow(Exception):
    """A row that is skipped and counted; the message is the reason (names the column)."""


class RowError(Exception):
    """A row that stops the run; the caller adds the file and row to the message."""


def known_columns() -> list[str]:
    return sorted({c for cols in (*FORMAT_COLUMNS.values(), *OPTIONAL_COLUMNS.values()) for c in cols})


def detect_format(columns: Sequence[str], fmt: str, where: str = "the data set") -> str:
    """Resolve `auto` from the column names and check the columns fit the format."""
    columns = sorted(columns)
    candidates = list(FORMAT_COLUMNS) if fmt == "auto" else [fmt]
    for name in candidates:
        if all(c in columns for c in FORMAT_COLUMNS[name]):
            return name
    fits = [n for n, c in FORMAT_COLUMNS.items() if all(col in columns for col in c)]
    if fits:  # a pinned format the columns do not fit, but another one does
        raise UsageError(f"data.format {fmt!r}: {where} has columns {columns}, which do not fit {fmt!r} "
                         f"(it needs {', '.join(FORMAT_COLUMNS[fmt])}); did you mean data.format={fits[0]} "
                         "(or data.format=auto)?")
    wanted = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMAT_COLUMNS.items() if n in candidates)
    raise UsageError(f"data.format {fmt!r}: {where} has columns {columns}, which fit no format "
                     f"(needed columns - {wanted}; data.columns maps other names)")


def text(row: dict[str, Any], column: str, optional: bool = False, where: str = "") -> str:
    """The string in `row[column]`: None / empty is a skip (or "" when optional), a non-string an error."""
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"missing '{where}{column}'")
    if not isinstance(value, str):
        raise RowError(f"'{where}{column}' is {type(value).__name__} {_short(value)}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"'{where}{column}' is not valid Unicode (a lone surrogate)") from None
    if not value.strip() and not optional:
        raise BadRow(f"empty '{where}{column}'")
    return value


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def turns(value: Any, column: str, role_key: str = "role", content_key: str = "content",
          roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """A list of {role, content} turns from `value`, roles mapped through `roles` (default: as is)."""
    if value is None:
        raise BadRow(f"missing '{column}'")
    if not isinstance(value, list):
        raise RowError(f"'{column}' is {type(value).__name__} {_short(value)}, expected a list of turns")
    allowed = roles or {r: r for r in CHAT_ROLES}
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"'{column}' turn {i} is {type(turn).__name__} {_short(turn)}, expected a "
                           f"{{{role_key}, {content_key}}} mapping")
        role = text(turn, role_key, where=f"{column}[{i}].")
        if role not in allowed:
            raise RowError(f"'{column}' turn {i}: {role_key} {role!r} is not one of {', '.join(allowed)}")
        out.append({"role": allowed[role], "content": text(turn, content_key, where=f"{column}[{i}].")})
    return out


def _conversation(messages: list[dict[str, str]], column: str) -> list[dict[str, str]]:
    if not messages:
        raise BadRow(f"empty '{column}'")
    if not any(t["role"] == "assistant" for t in messages):
        raise BadRow(f"'{column}' has no assistant turn")
    return messages


def canonical(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """{messages, prompt, completion, query} of a row of format `fmt` (raises BadRow / RowError)."""
    if fmt in ("chat", "sharegpt"):
        column = FORMAT_COLUMNS[fmt][0]
        keys = ("role", "content", None) if fmt == "chat" else ("from", "value", SHAREGPT_ROLES)
        return _chat_row(_conversation(turns(row.get(column), column, *keys), column))
    if fmt == "prompt-completion" and isinstance(row.get("prompt"), list):
        prompt, completion = turns(row["prompt"], "prompt"), turns(row.get("completion"), "completion")
        return _chat_row(_conversation(prompt + completion, "completion"))
    if fmt == "text":
        return {"messages": [], "prompt": "", "completion": text(row, "text"), "query": ""}
    if fmt == "alpaca":
        instruction, extra = text(row, "instruction"), text(row, "input", optional=True)
        template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT
        return {"messages": [], "prompt": template.format(instruction=instruction, input=extra),
                "completion": text(row, "output"), "query": instruction}
    prompt_column, completion_column = FORMAT_COLUMNS[fmt]
    prompt = text(row, prompt_column)
    return {"messages": [], "prompt": prompt, "completion": text(row, completion_column), "query": prompt}


def _chat_row(messages: list[dict[str, str]]) -> dict[str, Any]:
    users = [t["content"] for t in messages if t["role"] == "user"]
    return {"messages": messages, "prompt": "", "completion": "", "query": users[0] if users else ""}


def portable(row: dict[str, Any]) -> dict[str, Any]:
    """A canonical row as a chat or prompt-completion row (what `detect_format` reads back)."""
    if row["messages"]:
        return {"messages": row["messages"]}
    return {"prompt": row["prompt"], "completion": row["completion"], "query": row["query"]}


def render_chat(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """A conversation through the chat template, and the character spans of its assistant turns.

    Assistant turn i spans from the end of `template(messages[:i], add_generation_prompt=True)` to
    the end of `template(messages[:i+1])` in the rendered whole conversation, so the assistant text
    and the template's end-of-turn tokens are trained and the role headers are not.
    """
    if tokenizer.chat_template is None:
        raise UsageError("chat rows need a tokenizer with a chat template; this one has none "
                         "(set data.chat_template, or use format alpaca, input-output or text)")

    def render(part: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    whole, spans = render(messages), []
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            prompt, done = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
            if not (done.startswith(prompt) and whole.startswith(done)):
                raise UsageError("the chat template does not render conversations prefix by prefix, so "
                                 "assistant turns cannot be located; set data.train_on_prompt=true")
            spans.append((len(prompt), len(done)))
    return whole, spans


def render_row(row: dict[str, Any], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Text of a canonical row and the sorted, disjoint character spans [start, end) that carry loss."""
    if row["messages"]:
        return render_chat(row["messages"], tokenizer)
    prompt, completion = row["prompt"], row["completion"]
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def prompt_of(row: dict[str, Any]) -> str | None:
    """The bare question of a canonical or portable row (None when it has none), for samples."""
    if row.get("query"):
        return row["query"]
    users = [m.get("content") for m in row.get("messages") or [] if m.get("role") == "user"]
    return users[0] if users and isinstance(users[0], str) else None
