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

Packed rows (`position_ids` given, from `qlora.data.batching.pack`): the backbone gets the
position ids and no 2-D attention mask, which is how transformers recognises packed documents;
SDPA and eager attention then get a block-diagonal causal mask (b x 1 x T x T booleans, or the
compute dtype for eager) built once per forward. Flash attention gets varlen kwargs instead
(`packed_attention_kwargs`: cumulative document lengths over the flattened batch), so it neither
materialises a mask nor re-derives the documents in every layer.

Preference objectives need per-sequence sums instead of one total: `sequence_logps` runs the same
gathering and chunk loop with per-token log-probs, added into their rows (`index_add`), so DPO's
chosen + rejected passes cost no more logit memory than the supervised loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.nn.router_loss import balancing_function, router_aux_loss

IGNORE_INDEX = -100


FLASH_PREFIX = "flash"  # flash_attention_2 / _3 and hub kernels named flash...


def packed_attention_kwargs(position_ids: torch.Tensor, attn_implementation: str | None) -> dict:
    """Extra backbone kwargs for packed rows: flash attention's varlen arguments, else none.

    Documents start where the position is 0; over the flattened (1, b*T) stream their starts are
    `cu_seq_lens` (int32, ending with b*T) and the longest is `max_length` (a host int: one sync).
    """
    if not (attn_implementation or "").startswith(FLASH_PREFIX):
        return {}
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1).to(torch.int32)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])])
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _chunk_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


class CausalLMLoss(nn.Module):
    """Wraps a transformers causal LM: forward(input_ids, attention_mask, labels) -> (loss_sum, n_tokens).

    With `position_ids` (packed rows) `attention_mask` is not passed on: see the module docstring.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.router_loss: torch.Tensor | None = None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden states (b, T, H); packed rows when `position_ids` is given.

        A mixture-of-experts model whose config asks for its load-balancing loss leaves that term
        in `self.router_loss` (qlora.nn.router_loss), else None.
        """
        backbone = self.model.get_decoder()
        router = {"output_router_logits": True} if balancing_function(self.model) else {}
        if position_ids is None:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **router)
        else:
            packed = packed_attention_kwargs(position_ids, getattr(self.model.config, "_attn_implementation", None))
            out = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed, **router)
        self.router_loss = router_aux_loss(self.model, out.router_logits, attention_mask) if router else None
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                target_positions: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        head, hidden, targets, _ = self._targets(input_ids, attention_mask, labels, target_positions, position_ids)
        total = hidden.new_zeros((), dtype=torch.float32)
        for chunk in self._chunks(_chunk_loss, head, hidden, targets):
            total = total + chunk
        if self.router_loss is not None:  # per token, as transformers adds it to its mean loss
            total = total + self.router_loss.float() * targets.numel()
        return total, torch.tensor(targets.numel())

    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       target_positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                       n_segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed log-probability of its target tokens (fp32, (b,)) and their count (b,).

        The same gathering and chunking as the loss (never the full logits): each chunk's per-token
        log-probs are added into their row with `index_add`. What preference objectives score.
        `segments` (N,) (with `n_segments`) sends each target to another bucket than its row.
        """
        head, hidden, targets, positions = self._targets(input_ids, attention_mask, labels, target_positions, None)
        rows = torch.div(positions, labels.shape[1] - 1, rounding_mode="floor") if segments is None else segments
        n_segments = labels.shape[0] if segments is None else n_segments
        logps = hidden.new_zeros(n_segments, dtype=torch.float32)
        start = 0
        for chunk in self._chunks(_chunk_token_logps, head, hidden, targets):
            logps = logps.index_add(0, rows[start:start + chunk.numel()], chunk)
            start += chunk.numel()
        return logps, torch.bincount(rows, minlength=n_segments)

    def _targets(self, input_ids, attention_mask, labels, target_positions, position_ids):
        """(lm_head, hidden states of the target positions (N, H), their targets (N,), their flat positions)."""
        head = self.model.get_output_embeddings()
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        targets = labels[:, 1:].reshape(-1)  # token t predicts token t+1
        if target_positions is None:
            target_positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one device sync
        target_positions = target_positions.to(targets.device, non_blocking=True)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, target_positions)  # (N, H)
        return head, hidden, targets.index_select(0, target_positions), target_positions

    def _chunks(self, fn, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
        """fn(head, h, y) over `chunk_size` rows at a time, each checkpointed when grads are on (0: one chunk)."""
        size = self.chunk_size or max(targets.numel(), 1)
        for start in range(0, targets.numel(), size):
            h, y = hidden[start:start + size], targets[start:start + size]
            if torch.is_grad_enabled():
                yield checkpoint(fn, head, h, y, use_reentrant=False)
            else:
                yield fn(head, h, y)
