"""Text generation with a (4-bit, LoRA-adapted) model: prompts, chat rendering, before/after.

Generation goes through transformers' `generate` (greedy, or sampling with temperature / top-p)
on our modules; a 4-bit layer with a handful of rows reads its packed weight directly through the
fused matvec, so decoding never dequantises whole weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from qlora.errors import UsageError
from qlora.nn.adapter import adapter_layers


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter layer skips its update inside the block."""
    layers = [m for m in adapter_layers(model).values() if not m.disabled]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def render_chat(tokenizer, messages: list[dict], chat: bool = True) -> str:
    """A conversation rendered with the tokenizer's chat template, ending in the assistant header.

    Without a chat template (or with `chat=False`) the last user message is used as raw text.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages[-1]["content"]


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """A UsageError when the prompt and the new tokens do not fit the model's context window."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the prompt's {prompt_tokens} tokens plus that exceed "
                         f"the model's context of {context} tokens; expected at most {max(room, 0)}"
                         f"{' (the prompt alone fills it: /reset the chat or shorten it)' if room < 1 else ''}")


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | list[dict], *, max_new_tokens: int = 48,
             temperature: float = 0.0, top_p: float = 1.0, chat: bool = True, seed: int | None = None) -> str:
    """Answer one prompt (or a list of chat messages); temperature 0 is greedy decoding."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render_chat(tokenizer, messages, chat)
    templated = chat and getattr(tokenizer, "chat_template", None)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    inputs = inputs.to(next(model.parameters()).device)
    check_context(model, inputs["input_ids"].shape[1], max_new_tokens)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True,
                              "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def before_after(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    """Greedy answers of the base model (adapters off) and of the adapted model, per prompt."""
    rows = []
    for prompt in prompts:
        with adapters_disabled(model):
            before = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        after = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        rows.append({"prompt": prompt, "before": before, "after": after})
    return rows
