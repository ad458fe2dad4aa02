"""Built-in preference pairs from the embedded chatterbot conversations (`data.dataset: chatterbot-pairs`).

For each conversation with an answer: the prompt is every turn before its last assistant turn,
`chosen` is that turn (the conversation's own reply) and `rejected` a reply drawn, with a fixed
seed, from another conversation whose reply differs. Such pairs teach a model to prefer an answer
that belongs to the question over a fluent but unrelated one, which a held-out reward accuracy
measures directly; a model that ignored the prompt would score 50%.
"""

from __future__ import annotations

import random
from typing import Any

PAIRS_SEED = 0


def chatterbot_pairs(chat_rows: list[dict[str, Any]], seed: int = PAIRS_SEED) -> list[dict[str, Any]]:
    """Conversational preference rows {prompt, chosen, rejected} (lists of {role, content} turns)
    from chat rows {messages} (`qlora.data.sources.chatterbot_rows`)."""
    answered = []
    for row in chat_rows:
        turns = row["messages"]
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is not None and last > 0:
            answered.append((turns[:last], turns[last]))
    rng = random.Random(seed)
    rows = []
    for i, (prompt, reply) in enumerate(answered):
        j = rng.randrange(len(answered) - 1)
        j += j >= i  # another conversation
        other = answered[j][1]
        if other["content"].strip() == reply["content"].strip():
            continue
        rows.append({"prompt": prompt, "chosen": [reply], "rejected": [dict(other)]})
    return rows
