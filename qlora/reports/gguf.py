"""What an exported GGUF changes: held-out perplexity against the merged model, and greedy tokens,
through transformers' GGUF reader and through llama.cpp itself (``llama-cpp-python``).

The held-out text is the run's own held-out split (``data.eval_size`` rows at ``data.seed``, the
rows its evaluations score), each conversation rendered with the chat template it trained with,
then joined into one token stream cut into non-overlapping windows, as
`qlora.reports.perplexity.mean_nll` scores it: ppl = exp(mean next-token NLL), the first token of
each window context only. llama.cpp is scored the same way from its logits (``logits_all``).

Greedy decoding is argmax at every step, stopped at eos or after ``max_new`` tokens, in both
implementations: llama.cpp reads the GGUF, transformers the merged folder in fp32 (the f16 or
bf16 weights, exactly, with fp32 arithmetic, as llama.cpp's CPU kernels accumulate).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qlora.errors import UsageError


def heldout_chats(run_dir: Path) -> list[list[dict]]:
    """The run's held-out chat rows (their messages), as its evaluations split them."""
    from qlora.data.loaders import split_sources
    from qlora.recipe import load_recipe
    from qlora.run_dir import RunDir

    cfg = load_recipe(RunDir(run_dir).recipe, [])
    _, _, _, rows = split_sources(cfg.data)
    chats = [row["messages"] for row in rows if row.get("messages")]
    if not chats:
        raise UsageError(f"{run_dir}: no held-out chat rows (data.eval_size=0, or not a chat data set)")
    return chats


def heldout_stream(chats: list[list[dict]], tokenizer) -> torch.Tensor:
    """Every chat rendered with ``tokenizer``'s template, as one token stream."""
    return torch.tensor([t for chat in chats for t in tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)])


def first_prompt(chat: list[dict], tokenizer) -> list[int]:
    """A chat up to its first answer, with the generation prompt: what greedy decoding continues."""
    turn = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(chat[:turn], tokenize=True, add_generation_prompt=True, return_dict=False)


def hf_nll(model, token_ids: torch.Tensor, window: int) -> float:
    from qlora.reports.perplexity import mean_nll

    return mean_nll(model, token_ids, window, batch=8)[0]


def llama_cpp_model(path: Path, n_ctx: int):
    """A llama.cpp model of the GGUF at ``path`` (one thread per core given by OMP_NUM_THREADS)."""
    import os

    from llama_cpp import Llama

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    n_ctx = max(n_ctx, 512)  # llama.cpp pads small contexts to 256; 128 with logits_all crashed 0.3.36
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True,
                 verbose=False)


def llama_cpp_nll(llm, token_ids: torch.Tensor, window: int) -> float:
    """Mean next-token NLL (nats) of llama.cpp over the same windows `hf_nll` scores."""
    import numpy as np

    n_windows = token_ids.numel() // window
    total, count = 0.0, 0
    for ids in token_ids[: n_windows * window].reshape(n_windows, window).tolist():
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[:window], dtype=np.float32))
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total, count = total + nll.item(), count + window - 1
    return total / count


def llama_cpp_greedy(llm, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < max_new:
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def hf_greedy(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return ids[0, len(prompt):].tolist()


def ppl(nll: float) -> float:
    return math.exp(nll)
