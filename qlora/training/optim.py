"""Optimiser and learning-rate schedule for the trainable (LoRA) parameters.

Optimisers by name: bitsandbytes' paged 8-bit AdamW (the QLoRA paper's; its two Adam moments are
stored as blockwise-quantised uint8 with a dynamic code, 256 values per fp32 absmax, so they cost
2 bytes/param instead of 8, and paging lets CUDA evict them to host memory under memory spikes),
8-bit AdamW, paged 32-bit AdamW, or qlora's AdamW (`training/adamw.py`: fp32 moments whatever the
adapters' dtype, where torch's would keep bf16 ones; a bad step skipped on the device). bitsandbytes
keeps fp32 (or 8-bit) states for bf16 parameters too. Paging needs CUDA unified memory: with parameters
on the CPU the un-paged bitsandbytes class is used and that is logged once, here, instead of
bitsandbytes warning on its own. bitsandbytes is imported only when a bitsandbytes optimiser is
built (its import costs seconds). `check_available` runs before the model loads, so a missing
bitsandbytes (or one without its CUDA library on a CUDA run) is reported in seconds, not after the load.

Parameter groups come from the roles adapter layers give their tensors (`qlora.nn.adapter.Role`),
never from names: weight decay goes to the low-rank factors only (Role.A / Role.B), never to
magnitudes, biases or norms; LoRA+ gives Role.B the learning rate `lr * lora_plus_ratio` (Hayou et
al. 2024: B should learn faster than A). Groups carry a `name`.

Schedule (`build_scheduler`): LambdaLR with a multiplier of the group's base lr, s = completed steps:
  warmup   s < W:  (s + 1) / W               (the first step already moves; step W-1 is at full lr)
  then     p = (s - W) / max(1, T - W) in [0, 1]
           constant: 1;  linear: m + (1 - m)(1 - p);  cosine: m + (1 - m)(1 + cos(pi p)) / 2
with W warmup steps, T total steps and m = min_lr_ratio. The multiplier is a small picklable
object, so the scheduler's state_dict round-trips.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from qlora.choices import OPTIMIZERS
from qlora.config import OptimConfig
from qlora.errors import UsageError
from qlora.nn.adapter import Role, trainable_with_roles
from qlora.training.adamw import AdamW

log = logging.getLogger(__name__)

# optim.name -> (bitsandbytes class on CUDA, bitsandbytes class off CUDA); None: qlora's AdamW
_BNB_CLASSES = {
    "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
    "adamw_8bit": ("AdamW8bit", "AdamW8bit"),
    "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit"),
    "adamw": None,
}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into named groups by role: "lora" (A and other decaying factors),
    "lora_B" (LoRA+ learning rate), "no_decay" (magnitudes, biases, norms, ...)."""
    groups = {
        "lora": {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "lora_B": {"params": [], "lr": cfg.lr * cfg.lora_plus_ratio, "weight_decay": cfg.weight_decay},
        "no_decay": {"params": [], "lr": cfg.lr, "weight_decay": 0.0},
    }
    for _, param, role in trainable_with_roles(model):
        key = "lora_B" if role is Role.B else "lora" if role.decays else "no_decay"
        groups[key]["params"].append(param)
    if not any(g["params"] for g in groups.values()):
        raise UsageError("the model has no trainable parameters; check lora.targets matches some layers")
    return [{"name": key, **g} for key, g in groups.items() if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser `cfg.name` over the trainable parameters of `model`."""
    groups = param_groups(model, cfg)
    kwargs = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name not in OPTIMIZERS:
        raise UsageError(f"optim.name: {cfg.name!r} is not allowed; expected one of {', '.join(OPTIMIZERS)}")
    classes = _BNB_CLASSES[cfg.name]
    if classes is None:
        return AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    cls_name = classes[0] if on_cuda else classes[1]
    if cls_name != classes[0]:
        log.warning("optim: %s pages optimiser state through CUDA unified memory; the parameters are "
                    "not on CUDA, so the un-paged bitsandbytes %s is used", cfg.name, cls_name)
    return getattr(bnb.optim, cls_name)(groups, **kwargs)


def check_available(cfg: OptimConfig, device: torch.device) -> None:
    """Raise UsageError now when `cfg.name` needs a bitsandbytes that is missing or, on CUDA, lacks
    its CUDA library (bitsandbytes then imports, and fails at the first step)."""
    if _BNB_CLASSES.get(cfg.name) is None:
        return
    fix = "install bitsandbytes (pip install bitsandbytes) or set optim.name=adamw"
    try:
        from bitsandbytes.cextension import lib
    except Exception as err:  # ImportError, or a broken install failing at import time
        raise UsageError(f"optim.name: {cfg.name!r} needs bitsandbytes, which does not import "
                         f"({type(err).__name__}: {err}); {fix}") from None
    if device.type == "cuda" and not getattr(lib, "compiled_with_cuda", False):
        raise UsageError(f"optim.name: {cfg.name!r} on CUDA needs bitsandbytes' CUDA library, which did not "
                         f"load (bitsandbytes {type(lib).__name__}); install the bitsandbytes build for this "
                         "CUDA, or set optim.name=adamw")


@dataclass
class LRMultiplier:
    """Learning-rate multiplier at completed step s: linear warmup, then constant / linear / cosine."""

    warmup_steps: int
    total_steps: int
    kind: str
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """cfg.warmup_steps, or cfg.warmup_ratio of total_steps (rounded up)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + `cfg.scheduler` over `total_steps` optimiser steps; call `.step()` after each step."""
    if total_steps <= 0:
        raise UsageError(f"the run has {total_steps} optimiser steps; expected at least 1 "
                         "(check train.max_steps / train.epochs and the data size)")
    if cfg.scheduler not in ("constant", "linear", "cosine"):
        raise UsageError(f"optim.scheduler: {cfg.scheduler!r} is not allowed; expected cosine, linear or constant")
    multiplier = LRMultiplier(warmup_steps(cfg, total_steps), total_steps, cfg.scheduler, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def clip_gradients(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> torch.Tensor:
    """Clip the global L2 norm of all gradients in `optimizer` to max_grad_norm (None / 0: no clip).

    Returns the norm before clipping as a 0-dim tensor on the gradients' device (reading it is a
    host sync: the loop does so only when it logs).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    limit = max_grad_norm if max_grad_norm else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
