"""Training hooks: what an adapter family adds to each training step, behind one small protocol.

    penalty()          a differentiable term added to the loss of every optimiser step (or None)
    after_step(step)   called after optimiser step `step` (1-based), before the gradients are
                       cleared; returns metrics to log
    state_dict() / load_state_dict(state)   what a checkpoint must keep for an exact resume

The loop runs whatever `training_hooks` returns for the spec, so a variant that needs per-step
work (AdaLoRA's rank allocation) brings it here and the loop body has no special case for it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from qlora.adapters.spec import LoraSpec


class TrainingHook(Protocol):
    def penalty(self) -> torch.Tensor | None: ...

    def after_step(self, step: int) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def training_hooks(model: nn.Module, spec: LoraSpec) -> list[TrainingHook]:
    """The hooks the adapters of `spec` need (`spec.scheduled(total_steps)` first for AdaLoRA)."""
    if spec.adalora is None:
        return []
    from qlora.adapters.adalora import RankAllocator

    return [RankAllocator(model, spec.adalora)]
