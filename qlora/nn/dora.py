"""`DoRALinear`: weight-decomposed low-rank adaptation (Liu et al., 2024), beside `LoRALinear`.

DoRA splits the adapted weight into a direction and a per-output-feature magnitude m (out,):

    W' = m / ||W + s B A||_row * (W + s B A)        ||.||_row: the L2 norm of each output row
                                                   (PEFT calls it the column-wise norm of W.T)

m starts at ||W||_row, so with B = 0 the layer equals its base. Following the paper (section 4.3)
and PEFT, the norm is treated as a constant in backward (detached): gradients reach m directly and
A, B only through the direction. The forward never builds W'; with f = m / ||W + s B A||_row it
computes what PEFT computes,

    y = base(x) + (f - 1) * (W x) + f * s * B A dropout(x)

where W x is base(x) minus its bias without dropout (no extra matmul) and W dropout(x) when
dropout is active in training (one more base matmul, as PEFT). W is the base weight, dequantised
exactly for a 4-bit base, so each forward costs one dequantisation more than LoRA (the norm).

Precision trade-off: m and the norm are fp32 whatever the adapter dtype. m has out_features
elements (tiny), and computing it and the norm the same way in fp32 makes f exactly 1 at
initialisation, so a fresh DoRA layer equals its base bit for bit (a bf16 m would be off by up to
2**-9 in every row). PEFT's key for m is `<fqn>.lora_magnitude_vector` (a plain tensor, no
`.weight`), which is this module's parameter name, so the PEFT format needs no special case.

Merging: W' above in fp32, rounded once (`dora_weight`, also used by the state-dict merge). The
norm of the unmerged weight is kept at `merge()` so that `unmerge()` can invert it,
W = W' / f - s B A (equal to the original up to rounding, like LoRA's unmerge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.adapter import Role
from qlora.nn.lora import LoRALinear


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta||_row as fp32 (out,): the L2 norm of each output row, from (out, in) tensors."""
    return torch.linalg.vector_norm(weight.detach().float() + delta, dim=1)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The merged DoRA weight m / ||W + delta||_row * (W + delta) as fp32 (out, in).

    `weight` is the (dequantised) base weight in any dtype, `delta` the fp32 s * B @ A,
    `magnitude` the (out,) vector m.
    """
    adapted = weight.detach().float() + delta
    norm = torch.linalg.vector_norm(adapted, dim=1)
    return adapted * (magnitude.detach().float() / norm).unsqueeze(1)


class DoRALinear(LoRALinear):
    """A `LoRALinear` whose adapted weight is renormalised per output row to a trainable magnitude.

    Same arguments as `LoRALinear`; the extra trainable tensor `lora_magnitude_vector` (fp32,
    out_features, Role.MAGNITUDE: no weight decay) starts at the base weight's row norms. It reuses
    LoRA's A, B, dropout, scaling and merge checks, and overrides what DoRA changes: the forward,
    the update (`delta_weight`), merge, unmerge and `merged_linear`.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=self.lora_A.weight.device))
        self.reset_magnitude()
        self._merged_norm: torch.Tensor | None = None

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_row: the layer computes base + LoRA exactly (after B = 0: the base;
        after LoftQ / PiSSA set A and B: their start)."""
        self.lora_magnitude_vector.copy_(row_norm(self.base_weight(), self.lora_delta()))

    def trainable_parameters(self) -> dict[str, tuple[nn.Parameter, Role]]:
        """A, B and the magnitude (the `AdapterLayer` protocol)."""
        return {**super().trainable_parameters(), "lora_magnitude_vector": (self.lora_magnitude_vector, Role.MAGNITUDE)}

    def lora_delta(self) -> torch.Tensor:
        """s * B @ A as fp32 (out, in), LoRA's update (the direction's change)."""
        return super().delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the base's output dtype (see module docstring)."""
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        dx = self.dropout(x.to(self.lora_A.weight.dtype))
        lora = F.linear(self.lora_A(dx), self.lora_B.weight) * self.scaling  # (..., out)
        with torch.no_grad():
            norm = row_norm(self.base_weight(), self.lora_delta())
        scale = (self.lora_magnitude_vector / norm).to(out.dtype)  # (out,): grad flows to m only
        bias = getattr(self.base, "bias", None)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        base_out = self.base(dx.to(x.dtype)) if dropped else out
        if bias is not None:
            base_out = base_out - bias
        return out + (scale - 1) * base_out + scale * lora.to(out.dtype)

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """W' - W as fp32 (out, in): what the adapter adds to the base weight."""
        weight = self.base_weight()
        return dora_weight(weight, self.lora_delta(), self.lora_magnitude_vector) - weight.float()

    def _folded(self, weight: torch.Tensor) -> torch.Tensor:
        """round(W') in W's dtype; keeps the unmerged norm for `_unfolded`."""
        delta = self.lora_delta()
        self._merged_norm = row_norm(weight, delta)
        return dora_weight(weight, delta, self.lora_magnitude_vector).to(weight.dtype)

    def _unfolded(self, weight: torch.Tensor) -> torch.Tensor:
        """round(W' * ||W + s B A||_row / m - s B A), with the norm kept by `_folded`."""
        factor = (self.lora_magnitude_vector.detach().float() / self._merged_norm).unsqueeze(1)
        self._merged_norm = None
        return (weight.float() / factor - self.lora_delta()).to(weight.dtype)

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new `nn.Linear` holding W' (fp32, rounded once to `dtype`, default the base's)."""
        weight = self.base_weight()
        dtype = dtype or weight.dtype
        merged = weight if self.merged else dora_weight(weight, self.lora_delta(), self.lora_magnitude_vector)
        return self._linear_with(merged.to(dtype))
