"""`LoRALinear`: a low-rank adapter composed around any linear-like module.

LoRA (Hu et al., 2021) keeps the base weight W (out x in) frozen and learns a rank-r update:

    y = base(x) + scaling * B(A(dropout(x)))       A: in -> r,  B: r -> out
                                                   (one addmm: base(x) + scaling * h @ B.T)
    scaling = alpha / r            (LoRA)
    scaling = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023: keeps the update's scale stable
                                    as r grows, so large ranks actually learn)

A starts Kaiming-uniform (a=sqrt(5), as PEFT and the reference implementation) and B starts at
zero, so at step 0 the layer computes exactly `base(x)`. The adapters live in their own dtype
(bf16 by default: half the optimizer-visible memory of fp32, and no silent upcast); the adapter
output is cast back to the base output's dtype before the sum.

The base is anything with `in_features`, `out_features` and a forward (x (..., in) -> (..., out)):
`nn.Linear` or `qlora.nn.Linear4bit`. Composition, not inheritance: the parameter names are
`base.weight`, `lora_A.weight`, `lora_B.weight`, which map one-to-one onto PEFT's adapter keys.

Merging. The merged weight is W' = W + scaling * B @ A, computed in fp32 and rounded once to the
target dtype. For an `nn.Linear` base, `merge()` does this in place (and `unmerge()` subtracts the
same fp32 delta; a bf16 round trip may differ from the original by bf16 rounding). A `Linear4bit`
base is never re-quantised behind the user's back: `merge()` refuses, and `merged_linear()` returns
a new `nn.Linear` holding dequant(W) + delta, the exact export path.

Numerical guarantee (tested in tests/test_lora.py): for any input x (in the base's input dtype),
elementwise, with u = 2**-8 the bf16 unit roundoff,

    |merged(x) - unmerged(x)| <= 4 * u * (|x| @ |W|.T + scaling * |x| @ |A|.T @ |B|.T)

where merged(x) is the merged bf16/fp32 layer (`merge()`, or `merged_linear()` in bf16 for a
4-bit base). Counting roundings to bf16: the unmerged path rounds A x, B A x, the scaling and the
sum; the merged path rounds W + delta once and its output once; each is at most u of the magnitude
above. Measured on random layers (r=8, 128 -> 48, trained-sized B), the worst case is ~0.55 u, so
in practice the forwards agree to about one bf16 rounding of each output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora.errors import UsageError
from qlora.nn.adapter import Role
from qlora.nn.dropout import LoraDropout
from qlora.nn.linear4bit import Linear4bit


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A as fp32 (out, in), from A (r, in) and B (out, r) in any dtype."""
    return (lora_B.detach().float() @ lora_A.detach().float()) * scaling


def plus_update(out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """out + scaling * h @ B.T for h = A x (..., r): one addmm (the scaling and the sum folded into
    the GEMM) when B and out share a dtype, else the update is computed in B's dtype and cast."""
    if lora_B.dtype != out.dtype:
        return out + (F.linear(h, lora_B) * scaling).to(out.dtype)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.t(), alpha=scaling)
    return flat.view(out.shape)


def add_delta(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """round(W + delta) to `dtype` (default W's): the sum in fp32, one rounding."""
    return (weight.float() + delta).to(dtype or weight.dtype)


class LoRALinear(nn.Module):
    """`base(x) + scaling * lora_B(lora_A(dropout(x)))` with a frozen base.

    Args:
        base: the module to adapt; needs integer `in_features` / `out_features`. It is frozen
            (`requires_grad_(False)`) and kept as `self.base`.
        r: adapter rank, > 0.
        alpha: LoRA alpha, > 0; `scaling = alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
        dropout: dropout probability on the adapter's input, 0 <= dropout < 1.
        use_rslora: use the rank-stabilised scaling alpha / sqrt(r).
        dtype: dtype of `lora_A` / `lora_B` (default bf16).

    Attributes: `merged` (the adapter is folded into `base.weight`), `disabled` (forward skips the
    adapter; see `disable()` / `enable()`).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        in_features, out_features = _linear_shape(base)
        _check_hyperparameters(r, alpha, dropout)
        self.base = base.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.reset_adapter()
        self.merged = False
        self.disabled = False

    def reset_adapter(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) (PEFT's default), B = 0: the layer equals its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def trainable_parameters(self) -> dict[str, tuple[nn.Parameter, Role]]:
        """The adapter's trainable tensors and their roles (the `AdapterLayer` protocol)."""
        return {"lora_A.weight": (self.lora_A.weight, Role.A), "lora_B.weight": (self.lora_B.weight, Role.B)}

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (code that inspects `proj.weight.dtype/device` keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the base's output dtype."""
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return plus_update(out, h, self.lora_B.weight, self.scaling)

    # ---------------------------------------------------------------------------- enable/disable
    def disable(self) -> None:
        """Skip the adapter in forward (the layer computes `base(x)`), e.g. for a reference model."""
        if self.merged:
            raise UsageError("LoRALinear.disable: the adapter is merged into the base; unmerge() first")
        self.disabled = True

    def enable(self) -> None:
        """Use the adapter again after `disable()`."""
        self.disabled = False

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as an fp32 (out_features, in_features) tensor."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into an `nn.Linear` base in place: W <- round(W + scaling * B @ A)."""
        weight = self._mergeable_weight("merge")
        if self.merged or self.disabled:
            state = "already merged" if self.merged else "disabled (enable() first)"
            raise UsageError(f"{type(self).__name__}.merge: the adapter is {state}")
        weight.copy_(self._folded(weight))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()`: W <- round(W - scaling * B @ A) (equal to the original up to rounding)."""
        weight = self._mergeable_weight("unmerge")
        if not self.merged:
            raise UsageError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        weight.copy_(self._unfolded(weight))
        self.merged = False

    def _folded(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight round(W + scaling * B @ A) in W's dtype (variants override)."""
        return add_delta(weight, self.delta_weight())

    def _unfolded(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `_folded`, up to rounding."""
        return add_delta(weight, -self.delta_weight())

    def _mergeable_weight(self, action: str) -> torch.Tensor:
        if isinstance(self.base, Linear4bit):
            raise UsageError(
                f"{type(self).__name__}.{action}: the base is a 4-bit Linear4bit; merging in place would "
                "re-quantise the weight and lose the adapter's update. Use merged_linear() to get "
                "an exact nn.Linear with dequant(W) + scaling * B @ A"
            )
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise UsageError(
                f"{type(self).__name__}.{action}: the base {type(self.base).__name__} has no floating-point "
                "weight to merge into; use merged_linear()"
            )
        return weight

    def base_weight(self) -> torch.Tensor:
        """The base's (out, in) weight, detached: dequantised exactly for a 4-bit base."""
        if isinstance(self.base, Linear4bit):
            return self.base.dequantize()
        return self._mergeable_weight("base_weight").detach()

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new `nn.Linear` with weight dequant(W) + scaling * B @ A (fp32 sum, rounded once).

        Works for every base: `Linear4bit` is dequantised exactly (no re-quantisation), an
        `nn.Linear` base is read as is (if already merged, its weight is returned unchanged).
        `dtype` defaults to the base weight's own dtype (`quant_state.dtype` for 4-bit).
        """
        weight = self.base_weight()
        dtype = dtype or weight.dtype
        return self._linear_with(weight.to(dtype) if self.merged else add_delta(weight, self.delta_weight(), dtype))

    def _linear_with(self, weight: torch.Tensor) -> nn.Linear:
        """A new `nn.Linear` with `weight` (out, in) and a copy of the base's bias in its dtype."""
        bias = getattr(self.base, "bias", None)
        linear = nn.Linear(
            self.in_features, self.out_features, bias is not None, device="meta", dtype=weight.dtype
        )
        linear.weight = nn.Parameter(weight)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(weight.dtype).clone())
        return linear

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}, "
            f"merged={self.merged}, disabled={self.disabled}"
        )


def _linear_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module, or a UsageError saying what is missing."""
    shape = tuple(getattr(base, name, None) for name in ("in_features", "out_features"))
    if not all(isinstance(n, int) and n > 0 for n in shape):
        raise UsageError(
            f"LoRALinear: base {type(base).__name__} is not linear-like; it needs positive integer "
            f"in_features / out_features (got {shape[0]!r} / {shape[1]!r})"
        )
    return shape


def _check_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UsageError(f"LoRALinear: r={r!r}; expected an integer rank > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UsageError(f"LoRALinear: alpha={alpha!r}; expected a number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"LoRALinear: dropout={dropout!r}; expected 0 <= dropout < 1")


def _device_of(base: nn.Module) -> torch.device:
    """The device of the base's first parameter (CPU for a parameterless base)."""
    param = next(base.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
