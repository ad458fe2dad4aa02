"""Perplexity of a model in bf16 and in each 4-bit format, on one fixed held-out English text.

The model is loaded once per format (bf16, then nf4 + double quant, nf4, fp4, int4, all with block
size 64 like the QLoRA paper) and scored on one token stream cut into non-overlapping windows;
ppl = exp(sum of token NLLs / number of predicted tokens), each window's first token being context
only. The loss is ``CausalLMLoss`` (never the full logits).

The held-out text is the English one-line *answers* of the chatterbot-corpus package (1.3.3,
pinned by the ``embedded`` extra): real English sentences written by people, identical on every
machine and available offline; deduplicated, so the model gains nothing from repeats inside a
window; multi-line answers (code listings of the corpus' coding topic, not prose) are left out.
Whether SmolLM2's web-scale pretraining saw it cannot be ruled out (true of any public text). The
default fine-tuning recipe trains on the same corpus; that does not matter here, since this report
scores base models only (do not reuse the text to evaluate adapters trained on it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable

import torch

from qlora.errors import UsageError
from qlora.quant.format import QuantFormat

PPL_BLOCKSIZE = 64
# (label, quant_type, double_quant); None = the unquantised bf16 baseline.
PPL_FORMATS: tuple[tuple[str, str | None, bool], ...] = (
    ("bf16", None, False), ("nf4+dq", "nf4", True), ("nf4", "nf4", False),
    ("fp4", "fp4", False), ("int4", "int4", False))
# QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), Table 2: mean perplexity of OPT, BLOOM,
# LLaMA and Pythia models of 125M-13B parameters on Pile Common Crawl, per 4-bit data type.
PAPER_TABLE2 = {"int4": 34.34, "fp4 (E2M1)": 31.07, "fp4 (E3M0)": 29.48, "nf4+dq": 27.41}


def heldout_text() -> str:
    """The chatterbot-corpus English answers, deduplicated in corpus order (see module docstring)."""
    from qlora.data.sources import chatterbot_rows

    answers = [m["content"].strip() for row in chatterbot_rows("english") for m in row["messages"]
               if isinstance(m, dict) and m.get("role") == "assistant"]
    # Multi-line answers are code listings (the corpus' coding topic), not prose: left out.
    return "\n".join(dict.fromkeys(a for a in answers if a and "\n" not in a))


def heldout_tokens(model: str, n_tokens: int) -> tuple[torch.Tensor, dict]:
    """The first ``n_tokens`` token ids of the held-out text, and a description of it."""
    from qlora.hf.folder import load_tokenizer

    text = heldout_text()
    ids = load_tokenizer(model)(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens]), {
        "source": "chatterbot-corpus 1.3.3, English one-line answers (assistant turns), deduplicated, "
                  "'\\n'-joined",
        "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text), "tokens_available": len(ids)}


def mean_nll(model: torch.nn.Module, token_ids: torch.Tensor, window: int, batch: int) -> tuple[float, int]:
    """Mean next-token NLL (nats) over non-overlapping windows of ``token_ids``; (nll, tokens scored)."""
    from qlora.nn.loss import CausalLMLoss

    n_windows = token_ids.numel() // window
    if n_windows == 0:
        raise UsageError(f"perplexity needs at least one window of {window} tokens, got {token_ids.numel()}")
    windows = token_ids[: n_windows * window].reshape(n_windows, window)
    loss_fn = CausalLMLoss(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows.split(batch):
            loss_sum, n = loss_fn(ids, torch.ones_like(ids), ids)
            total, count = total + loss_sum.item(), count + int(n)
    return total / count, count


def perplexity_table(model: str, token_ids: torch.Tensor, settings,
                     progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """bf16 and every 4-bit format of ``PPL_FORMATS``: loss, perplexity and ratio to bf16."""
    from qlora.hf.load import load_model

    rows = []
    for label, quant_type, dq in progress(PPL_FORMATS):
        fmt = QuantFormat(quant_type, PPL_BLOCKSIZE, dq) if quant_type else None
        lm = load_model(model, quant=fmt)
        nll, n = mean_nll(lm, token_ids, settings.ppl_window, settings.ppl_batch)
        del lm
        rows.append({"format": label, "quant_type": quant_type, "double_quant": dq,
                     "blocksize": PPL_BLOCKSIZE if quant_type else None, "nll": nll, "ppl": math.exp(nll),
                     "tokens_scored": n})
    for row in rows:
        row["ppl_ratio_vs_bf16"] = row["ppl"] / rows[0]["ppl"]
    return rows
