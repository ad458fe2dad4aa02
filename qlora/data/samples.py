"""The held-out prompts that training answers before and after tuning, beside their references.

A sample answer is the first thing a user sees of a run, so the prompts are chosen to show what
the tuning taught, not the data set's most common reply nor a memorised row: held-out rows whose
question no training row asks come first (then the others), each in data set order, and a row is
kept only when its question and its reference answer (the row's first assistant turn, or its
completion) both differ from those already kept, compared case- and space-insensitively. In
chatterbot-corpus many questions share a stock reply and most held-out questions also occur in
the training rows (51 of the main job's 64): three unseen prompts with three different references
show whether the model learnt more than that.
"""

from __future__ import annotations

from qlora.data.formats import prompt_of


def reference_of(row: dict) -> str:
    """The answer a canonical row holds: its first assistant turn, or its completion."""
    answers = [m["content"] for m in row.get("messages") or [] if m.get("role") == "assistant"]
    return (answers[0] if answers else row.get("completion") or "").strip()


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def sample_prompts(rows, k: int) -> list[dict]:
    """Up to `k` {prompt, reference} pairs from the held-out rows (`qlora.data.rows.Rows.eval`),
    with distinct prompts and distinct references (see the module docstring)."""
    if not k:
        return []
    trained = {_key(prompt_of(row) or "") for row in rows.train}
    held = [row for row in rows.eval.select(range(min(len(rows.eval), 50 * k)))]
    held.sort(key=lambda row: _key(prompt_of(row) or "") in trained)  # stable: unseen questions first
    chosen: list[dict] = []
    seen: set[str] = set()
    for row in held:
        prompt, reference = prompt_of(row), reference_of(row)
        if not prompt or not reference or _key(prompt) in seen or _key(reference) in seen:
            continue
        seen |= {_key(prompt), _key(reference)}
        chosen.append({"prompt": prompt, "reference": reference})
        if len(chosen) == k:
            break
    return chosen
