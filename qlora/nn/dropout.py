"""Dropout on the LoRA branch's input, with a mask that costs one pass and no memory.

LoRA applies dropout to x (batch x tokens x in_features) before the rank-r down-projection, once
per adapted module: for a 135M model at 4 x 256 tokens that is ~150M elements a forward. torch's
CPU dropout draws a Bernoulli tensor, scales it and multiplies (three passes, a saved mask, and
~30 ns an element on two cores: it cost more than the adapters' matmuls). Here, on CPU tensors
with the native kernels built, the mask is a hash of (seed, element index):

    keep_i = hash(seed, i) >= p * 2**32          y_i = keep_i * x_i / (1 - p)   (fp32, one rounding)

The seed is drawn from torch's CPU generator at each forward, so seeding, checkpointing (which
restores the RNG state before recomputing a layer) and exact resume behave as with torch's
dropout; backward applies the same function to the gradient with the saved seed, so no mask is
kept for backward. Elsewhere (CUDA, no compiler) it is torch's `F.dropout`. The masks differ
from torch's stream, not in distribution: each element is dropped with probability p (to 2**-32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SEED_RANGE = 2**62


def _native():
    from qlora.quant import native

    return native if native.available() else None


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return _native().dropout(x.contiguous(), p, seed).view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return _native().dropout(grad.contiguous(), ctx.p, ctx.seed).view(grad.shape), None, None


def seeded_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of `x` with probability `p` (training mode), hashed mask on CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _native():
        seed = int(torch.randint(0, _SEED_RANGE, (), dtype=torch.int64))
        return _SeededDropout.apply(x, p, seed)
    return F.dropout(x, p, training=True)


class LoraDropout(nn.Module):
    """`nn.Dropout(p)` with the hashed CPU mask above; identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seeded_dropout(x, self.p) if self.training and self.p > 0 else x

    def extra_repr(self) -> str:
        return f"p={self.p}"
