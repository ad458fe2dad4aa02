"""`AdaLoRALinear`: the SVD-form adapter of AdaLoRA (Zhang et al., 2023), beside `LoRALinear`.

AdaLoRA writes the update as a singular value decomposition, P Lambda Q, and lets a rank budget
move between layers during training by zeroing the singular values of unimportant triplets:

    y = base(x) + s * B (E * (A dropout(x)))      A = Q (r, in), E = diag(Lambda) (r, 1), B = P (out, r)
    delta W = s * B @ (A * E)                     s = alpha / (r_init + 1e-5)

PEFT's exact scaling is kept (`ranknum` = the initial rank, plus 1e-5) so that PEFT's `SVDLinear`
computes the same output from our tensors. E starts at zero and A, B ~ N(0, 0.02) (PEFT's init),
so a fresh layer equals its base. A and B are not forced orthogonal; the training loss carries a
penalty ||A A^T - I||_F + ||B^T B - I||_F per layer (`orthogonality_penalty`) that keeps them
close to it, so that E holds the singular values and zeroing one entry removes one rank.

The rank never changes shape while training: the allocator (qlora.adapters.adalora) zeroes E
entries (as PEFT does) and records which triplets are kept in `rank_mask`. A saved adapter keeps
only those triplets (PEFT's `rank_pattern`).

The trainable tensors reuse LoRA's `lora_A` / `lora_B` modules (their weights have AdaLoRA's
shapes); their PEFT keys are `<fqn>.lora_A`, `<fqn>.lora_E`, `<fqn>.lora_B` (PEFT stores AdaLoRA's
factors as plain parameters, without `.weight`), which is what `trainable_parameters()` reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.adapter import Role
from qlora.nn.lora import LoRALinear, lora_delta, plus_update

PEFT_EPS = 1e-5  # PEFT's `ranknum + 1e-5` in the scaling


class AdaLoRALinear(LoRALinear):
    """A `LoRALinear` in SVD form: `base(x) + s * B (E * A dropout(x))` (see the module docstring).

    Same arguments as `LoRALinear` (r is AdaLoRA's initial rank; rsLoRA does not apply). Adds
    `lora_E` (r, 1) in the adapter dtype (Role.SINGULAR: no weight decay) and the bool buffer
    `rank_mask` (r,) of the triplets the allocator keeps.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        if use_rslora:
            raise ValueError("AdaLoRALinear: rsLoRA does not apply (the scaling is alpha / initial rank)")
        super().__init__(base, r, alpha, dropout, False, dtype)
        self.scaling = alpha / (r + PEFT_EPS)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.weight.device),
                             persistent=False)

    def reset_adapter(self) -> None:
        """E = 0, A and B ~ N(0, 0.02) (PEFT's init): the layer equals its base."""
        if not hasattr(self, "lora_E"):  # first call, from LoRALinear.__init__
            weight = self.lora_A.weight
            self.lora_E = nn.Parameter(torch.zeros(self.r, 1, device=weight.device, dtype=weight.dtype))
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B.weight, mean=0.0, std=0.02)

    def trainable_parameters(self) -> dict[str, tuple[nn.Parameter, Role]]:
        """A, E, B under PEFT's AdaLoRA keys (the `AdapterLayer` protocol)."""
        return {"lora_A": (self.lora_A.weight, Role.A), "lora_E": (self.lora_E, Role.SINGULAR),
                "lora_B": (self.lora_B.weight, Role.B)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the base's output dtype."""
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        h = F.linear(self.dropout(x.to(self.lora_A.weight.dtype)), self.lora_A.weight) * self.lora_E.view(-1)
        return plus_update(out, h, self.lora_B.weight, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ (A * E) as fp32 (out, in)."""
        return lora_delta(self.lora_A.weight.float() * self.lora_E.float(), self.lora_B.weight, self.scaling)

    def orthogonality_penalty(self) -> torch.Tensor:
        """||A A^T - I||_F + ||B^T B - I||_F in fp32 (differentiable; AdaLoRA's regulariser)."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        eye = torch.eye(self.r, device=a.device)
        return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)

    @torch.no_grad()
    def apply_rank_mask(self, mask: torch.Tensor) -> None:
        """Keep the triplets where `mask` (r,) is True: E of the others set to 0."""
        self.rank_mask.copy_(mask.to(self.rank_mask.device))
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept_rank={int(self.rank_mask.sum())}"
