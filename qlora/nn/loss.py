"""Causal-LM loss that never materialises the full logits.

For a vocabulary V, a batch of B x T tokens and fp32 logits, the usual `model(...).logits` costs
B*T*V*4 bytes, twice with its gradient: for SmolLM2 (V = 49,152) at 8 x 256 tokens that is 400 MB,
more than the 4-bit model. Instead we run the backbone to the last hidden states (B, T, H), keep
only the positions that have a target (prompt tokens masked with -100 cost nothing), and compute
`cross_entropy(lm_head(h_chunk).float(), y_chunk, reduction="sum")` chunk by chunk, each under
non-reentrant activation checkpointing, so at most one (chunk, V) fp32 block lives at a time and
is recomputed in backward.

The module returns the SUM of token losses and the number of target tokens, so that gradient
accumulation and data parallelism can normalise by the true token count of the whole optimiser
step (a mean per micro-batch would over-weight short batches). Given `target_positions` (computed
on the CPU by `qlora.data.batching.collate`) it gathers the target rows with `index_select` and
never waits for the device; without it a boolean mask does the same with one device sync.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class CausalLMLoss(nn.Module):
    """Wraps a transformers causal LM: forward(input_ids, attention_mask, labels) -> (loss_sum, n_tokens)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                target_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:].reshape(-1)  # token t predicts token t+1
        if target_positions is None:
            target_positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one device sync
        target_positions = target_positions.to(targets.device, non_blocking=True)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, target_positions)  # (N, H)
        targets = targets.index_select(0, target_positions)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.chunk_size):
            h, y = hidden[start:start + self.chunk_size], targets[start:start + self.chunk_size]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
            else:
                total = total + _chunk_loss(head, h, y)
        return total, torch.tensor(targets.numel())
