"""AdamW with fp32 moments for adapters in any dtype, and a step that can be skipped on the device.

Why not torch.optim.AdamW: it keeps its moments in the parameter's dtype. With bf16 adapters the
second moment then stops moving: `v * 0.999` rounds back to `v` in bf16 (8 significant bits, a
step of 2**-8 = 0.0039 > 0.001), so `v` keeps its first steps' value and small updates are lost.
Here the moments and the update are fp32 whatever the parameter's dtype; a bf16 parameter is
read as fp32, updated and rounded once (RNE) per step. For fp32 parameters this is torch's
AdamW formula (decoupled weight decay, bias-corrected moments):

    p <- p * (1 - lr * wd)
    m <- m + (1 - b1) * (g - m)           v <- b2 * v + (1 - b2) * g * g
    p <- p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

Skipping without a host sync: `step(keep=flag)` takes a 0-dim bool tensor on the device (the
finiteness of the gradient norm, `training/guard.py`). Every term is multiplied by `k = float(flag)`
and a non-finite gradient is replaced by 0 first, so with k = 0 each tensor is updated by exactly
+0 or a factor of exactly 1: parameters, moments and the step count `t` keep their bits, and the
host never has to read the flag before the next step is queued. `t` is a float64 tensor on the
parameter's device for the same reason (the bias corrections are computed there).

FSDP: parameters and gradients that are DTensors are updated through their local shards (the
update is elementwise), so the states are the local shards' shape.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 `exp_avg` / `exp_avg_sq` for parameters of any float dtype (see module docstring)."""

    skips_on_device = True  # guard.guarded_step passes `keep` instead of zeroing the gradients

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            local = _local(p)
            state["step"] = torch.zeros((), dtype=torch.float64, device=local.device)
            state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None, keep: torch.Tensor | None = None):
        """One update of every parameter with a gradient; with `keep` (0-dim bool) False it changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self._state(p), group, keep)
        return loss

    @staticmethod
    def _update(p: torch.Tensor, state: dict, group: dict, keep: torch.Tensor | None) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        param, grad = _local(p), _local(p.grad).float()
        if keep is not None:
            keep = keep.to(param.device)
            grad = torch.where(keep, grad, 0.0)

        def kept(value: float, skipped: float):
            """`value` on a kept step, `skipped` (an exact no-op) on a skipped one."""
            return value if keep is None else torch.where(keep, value, skipped)

        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        t.add_(kept(1.0, 0.0))
        p32 = param if param.dtype == torch.float32 else param.float()
        if wd:
            p32.mul_(kept(1 - lr * wd, 1.0))
        m.lerp_(grad, kept(1 - b1, 0.0))
        v.mul_(kept(b2, 1.0)).addcmul_(grad, grad, value=1 - b2)
        t1 = t.clamp(min=1)  # a skipped first step: no 0 / 0 (its update is multiplied by 0 anyway)
        denom = (v.sqrt() / (1 - b2 ** t1).sqrt().float()).add_(eps)
        p32.sub_(m / denom * (kept(lr, 0.0) / (1 - b1 ** t1)).float())
        if p32 is not param:
            param.copy_(p32)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating states to the parameter's dtype on load; keep them fp32 / float64."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = _local(value).to(_local(p).device, value.dtype, copy=True)
