"""Preference rows: TRL's paired and unpaired layouts as one canonical row, and their tokens.

| format              | columns                                          | canonical                      |
|---------------------|--------------------------------------------------|--------------------------------|
| preference          | prompt, chosen, rejected: strings ...            | prompt + chosen / rejected     |
|                     | ... or lists of {role, content} turns            | prompt_messages + *_messages   |
|                     | chosen, rejected conversations, no prompt column | the shared leading turns are   |
|                     | (implicit prompt)                                | the prompt (TRL's extract_prompt) |
| unpaired-preference | prompt, completion, label (true: desirable)      | prompt + chosen, label 1 / 0   |

A canonical row has `prompt`, `chosen`, `rejected` (text) and `prompt_messages`,
`chosen_messages`, `rejected_messages` (turns; the text columns are then empty), `label` (1 / 0
for unpaired rows, -1 for pairs) and `query` (the bare question, for sample answers). Bad rows
follow `qlora.data.formats`: a wrong type is an error naming the row; a missing / empty value, or
a pair whose chosen and rejected are identical, is a counted skip.

Tokens follow TRL's DPO trainer: the prompt alone (conversations with the generation prompt) and
prompt + completion are tokenised, and the completion starts where the two diverge; plain-text
completions get the EOS appended. Truncation keeps the start (prompt + completion cut at
`data.max_length`); a prompt that alone fills max_length leaves no completion token and is a
counted skip.
"""

from __future__ import annotations

from typing import Any

from qlora.data.formats import BadRow, RowError, text, turns
from qlora.errors import UsageError

PREFERENCE_FORMATS = ("preference", "unpaired-preference")
PAIRED, DESIRABLE, UNDESIRABLE = -1, 1, 0


def features():
    from datasets import Features, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    return Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
                     "prompt_messages": turn, "chosen_messages": turn, "rejected_messages": turn,
                     "label": Value("int64"), "query": Value("string"), "skip": Value("string"),
                     "part": Value("int64"), "row": Value("int64")})


def empty_row() -> dict[str, Any]:
    """The canonical columns with no content (a skipped row's)."""
    return {"prompt": "", "chosen": "", "rejected": "", "prompt_messages": [], "chosen_messages": [],
            "rejected_messages": [], "label": PAIRED, "query": ""}


def canonical_preference(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The canonical row of a `preference` / `unpaired-preference` row (raises BadRow / RowError)."""
    out = empty_row()
    if fmt == "unpaired-preference":
        label = row.get("label")
        if label is None:
            raise BadRow("missing 'label'")
        if not isinstance(label, bool):
            raise RowError(f"'label' is {type(label).__name__} {label!r}, expected true (desirable) or false")
        out["label"] = DESIRABLE if label else UNDESIRABLE
        completions = {"chosen": row.get("completion")}
        names = {"chosen": "completion"}
    else:
        completions = {"chosen": row.get("chosen"), "rejected": row.get("rejected")}
        names = {"chosen": "chosen", "rejected": "rejected"}
    conversational = any(isinstance(v, list) for v in (row.get("prompt"), *completions.values()))
    if conversational:
        _conversation(row, completions, names, out)
    else:
        if row.get("prompt") is None and fmt == "preference":
            raise BadRow("missing 'prompt' (an implicit prompt needs chosen / rejected conversations)")
        out["prompt"] = out["query"] = text(row, "prompt")
        for key, value in completions.items():
            out[key] = text({names[key]: value}, names[key])
    if fmt == "preference" and (out["chosen"], out["chosen_messages"]) == (out["rejected"], out["rejected_messages"]):
        raise BadRow("chosen and rejected are identical")
    return out


def _conversation(row: dict[str, Any], completions: dict, names: dict, out: dict) -> None:
    """Fill the *_messages columns; without a prompt, the shared leading turns become the prompt."""
    parsed = {key: turns(value, names[key]) for key, value in completions.items()}
    if row.get("prompt") is None:
        if len(parsed) < 2:
            raise BadRow("missing 'prompt'")
        shared = 0
        while all(shared < len(t) - 1 for t in parsed.values()) and parsed["chosen"][shared] == parsed["rejected"][shared]:
            shared += 1
        prompt = parsed["chosen"][:shared]
        parsed = {key: t[shared:] for key, t in parsed.items()}
    else:
        prompt = turns(row["prompt"], "prompt")
    if not prompt:
        raise BadRow("empty 'prompt'")
    for key, t in parsed.items():
        if not t:
            raise BadRow(f"empty '{names[key]}'")
        if t[0]["role"] != "assistant":
            raise RowError(f"'{names[key]}' starts with a {t[0]['role']!r} turn; a completion is assistant turns")
    out["prompt_messages"] = prompt
    users = [t["content"] for t in prompt if t["role"] == "user"]
    out["query"] = users[-1] if users else ""
    for key, t in parsed.items():
        out[f"{key}_messages"] = t


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_preference(row: dict[str, Any], tokenizer, max_length: int) -> tuple[dict[str, list] | None, str, bool]:
    """({prompt_ids, chosen_ids[, rejected_ids]}, "", truncated) of a canonical row, or (None, the
    reason, False) when it is skipped."""
    keys = ["chosen"] + (["rejected"] if row["label"] == PAIRED else [])
    if row["prompt_messages"]:
        if tokenizer.chat_template is None:
            raise UsageError("conversational preference rows need a tokenizer with a chat template; this one "
                             "has none (set data.chat_template)")

        def ids(messages, generation_prompt=False):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            return tokenizer(rendered, add_special_tokens=False)["input_ids"]

        prompt_ids = ids(row["prompt_messages"], generation_prompt=True)
        full = {k: ids(row["prompt_messages"] + row[f"{k}_messages"]) for k in keys}
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full = {k: tokenizer(row["prompt"] + (row[k] if row[k].endswith(eos) else row[k] + eos))["input_ids"]
                for k in keys}
    start = min(common_prefix(prompt_ids, f) for f in full.values())
    if start >= max_length:
        return None, "prompt alone fills data.max_length", False
    out = {"prompt_ids": prompt_ids[:start]}
    for key, f in full.items():
        out[f"{key}_ids"] = f[start:max_length]
        if not out[f"{key}_ids"]:
            return None, f"empty '{key}' after tokenising", False
    return out, "", any(len(f) > max_length for f in full.values())
