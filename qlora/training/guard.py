"""The finiteness guard: one bad optimiser step never ruins a run, and it costs no host sync.

A NaN or Inf anywhere in the gradients makes the global gradient norm non-finite, and that norm is
computed anyway by gradient clipping. `guarded_step` turns it into a 0-dim flag on the device and
steps without reading it: qlora's AdamW (`training/adamw.py`) takes the flag and leaves weights,
moments and step count bit for bit as they were on a bad step; a bitsandbytes optimiser cannot
take a flag, so the bad step's gradients are set to 0 on the device first and its step is one
with a zero gradient (no NaN reaches weights or states; Adam coasts on its decayed momentum).
The host learns of the step only when it reads anyway: at a logged step, before a checkpoint,
at the end of the run (`resolve`, one read for all pending steps). Then each step is classified:
the scheduler and the data advanced regardless, so step numbers keep their meaning and a resumed
run stays aligned. `max_bad_steps` bad steps in a row stop the run with `NonFiniteError` (exit
status 3) at that read: by then the run is not recovering by itself (learning rate too high, data
that overflows the dtype). With `train.log_every: 1` every step is read (the loss is logged).

A norm of exactly 0 for `max_bad_steps` steps in a row is warned about once: the adapters get no
signal (often a learning rate so high that the weights saturated), which used to go unnoticed.

Before any checkpoint or adapter is written, `weights_finite` checks the trainable tensors, so a
non-finite adapter never reaches disk and checkpoint rotation always keeps a finite one.

Test hook: with the environment variable `QLORA_INJECT_NAN_STEPS=3,4` the gradients of optimiser
steps 3 and 4 are made NaN just before clipping (`inject_nan`); `tools/chaos.py` and the tests use
it. It is read once per step and does nothing when unset.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn as nn

from qlora.errors import NonFiniteError

log = logging.getLogger("qlora")
INJECT_ENV = "QLORA_INJECT_NAN_STEPS"


class StepGuard:
    """Counts non-finite and all-zero gradient norms, one optimiser step at a time."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.zero_in_a_row = 0
        self.warned_dead = False
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, norm on the device), not read yet

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, step: int) -> None:
        """Optimiser step `step` (1-based), a no-op on the device when `grad_norm` is non-finite."""
        guarded_step(optimizer, grad_norm)
        self.pending.append((step, grad_norm.detach()))

    def resolve(self) -> bool:
        """Read every pending norm at once (one host sync); True when the last step was applied.
        Raises `NonFiniteError` once `max_bad_steps` steps in a row were bad."""
        if not self.pending:
            return self.bad_in_a_row == 0
        norms = torch.stack([n.float().reshape(()) for _, n in self.pending]).tolist()
        steps, self.pending = [s for s, _ in self.pending], []
        return [self.step_ok(norm, s) for s, norm in zip(steps, norms)][-1]

    def step_ok(self, grad_norm: float | torch.Tensor, step: int) -> bool:
        """True when optimiser step `step` (1-based) may be applied; raises after too many bad ones."""
        norm = float(grad_norm)
        if not math.isfinite(norm):
            self.bad_in_a_row += 1
            self.bad_total += 1
            log.warning("step %d: gradient norm is %s; the step is skipped (%d of train.max_bad_steps=%d "
                        "in a row)", step, norm, self.bad_in_a_row, self.max_bad_steps)
            if self.bad_in_a_row >= self.max_bad_steps:
                raise NonFiniteError(
                    f"{self.bad_in_a_row} optimiser steps in a row (up to step {step}) had a non-finite "
                    f"gradient norm (train.max_bad_steps={self.max_bad_steps}); the run folder keeps its "
                    "last finite checkpoint. Lower optim.lr, keep optim.max_grad_norm set, or check the data")
            return False
        self.bad_in_a_row = 0
        self.zero_in_a_row = self.zero_in_a_row + 1 if norm == 0.0 else 0
        if self.zero_in_a_row >= self.max_bad_steps and not self.warned_dead:
            self.warned_dead = True
            log.warning("step %d: the gradient norm has been exactly 0 for %d steps: the adapters get "
                        "no signal (a learning rate so high that the weights saturated?)", step, self.zero_in_a_row)
        return True

    def can_checkpoint(self, model: nn.Module, step: int) -> bool:
        """True when a periodic checkpoint may be written now: never inside a streak of bad steps
        (weights that blow up the next forward pass may still be finite), never non-finite weights."""
        self.resolve()
        if self.bad_in_a_row:
            log.warning("step %d: no checkpoint while steps are non-finite; the last one is kept", step)
            return False
        self.check_weights(model, step)
        return True

    def check_final(self, model: nn.Module, step: int) -> None:
        """Raise unless the final adapter may be written (finite weights); warn when the run ended
        inside a streak of skipped steps (the weights are those of the last good step)."""
        self.resolve()
        self.check_weights(model, step)
        if self.bad_in_a_row:
            log.warning("the run ended with %d skipped (non-finite) step(s) in a row; the adapter holds the "
                        "weights of step %d", self.bad_in_a_row, step - self.bad_in_a_row)

    @staticmethod
    def check_weights(model: nn.Module, step: int) -> None:
        if not weights_finite(model):
            raise NonFiniteError(f"the adapter weights are non-finite at step {step}; nothing was saved, "
                                 "the run folder keeps its last finite checkpoint. Lower optim.lr")


def weights_finite(model: nn.Module) -> bool:
    """True when every trainable tensor of `model` is finite (one host sync)."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters() if p.requires_grad]
    flags = [torch.isfinite(p.detach()).all() for p in full]  # FSDP: every process sees every value
    return bool(torch.stack(flags).all()) if flags else True


def guarded_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """`optimizer.step()` that changes nothing from a non-finite `grad_norm`, without reading it."""
    finite = torch.isfinite(grad_norm.detach())
    if getattr(optimizer, "skips_on_device", False):
        optimizer.step(keep=finite)
        return
    bad = ~finite
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                grad.masked_fill_(bad.to(grad.device), 0.0)
    optimizer.step()


def inject_nan(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Test hook: make the gradients of `step` NaN when QLORA_INJECT_NAN_STEPS lists it."""
    wanted = os.environ.get(INJECT_ENV)
    if not wanted or str(step) not in wanted.split(","):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
                return
