"""Held-out loss and perplexity of a model (+ adapter): the number training reports before and after,
and what `qlora eval` prints.

    loss = sum of target-token NLLs / number of target tokens     (over all processes)
    ppl  = exp(loss)

The loss is `CausalLMLoss` (chunked, never the full logits); the eval loader always restarts from
its first batch, so every evaluation of a run scores the same tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from qlora import runtime


@torch.no_grad()
def evaluate(loss_fn: nn.Module, loader, rt: runtime.Runtime, max_batches: int | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Mean token loss and perplexity over the eval loader on all processes.

    `on_batch(batches done, target tokens so far)` after each micro-batch (a progress display).
    `max_batches` caps the micro-batches in total (split over the processes, which take
    alternate batches), so the same batches are evaluated whatever the number of processes.
    """
    if max_batches is not None:
        max_batches = -(-max_batches // rt.world_size)
    loader.batch_sampler.load_state_dict({"epoch": 0, "index": 0})  # always the same batches, from the start
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        loss_sum, n = loss_fn(**{k: v.to(rt.device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + int(n)
        if on_batch is not None:
            on_batch(i + 1, count)
    loss_fn.train(was_training)
    total, count = runtime.all_reduce_sum([total, count], rt)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}
