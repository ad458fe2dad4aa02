"""LoftQ and PiSSA: starting the adapter from the weight it adapts, while the loader holds it in 16 bits.

Standard QLoRA starts from B = 0, so the model starts as the quantised base, dequant(Q(W)), with
the whole quantisation error W - dequant(Q(W)) left in it. Both methods here spend the rank-r
adapter on W itself at step 0 (s = the LoRA scaling):

    LoftQ (Li et al., 2023), T iterations, L_0 = 0:
        Q_t = quantise(W - L_{t-1});   s B_t A_t = SVD_r(W - dequant(Q_t));   L_t = s B_t A_t
    The model starts at dequant(Q_T) + s B_T A_T, closer to W than dequant(Q(W)). With T = 1
    the base is the standard Q(W) (only the adapter changes); with T > 1 the base changes.

    PiSSA (Meng et al., 2024):  s B A = SVD_r(W) (the principal part), base = quantise(W - s B A).
    Training then moves W's principal directions; the base holds the residual.

SVD_r is `torch.svd_lowrank` (randomised, Halko et al.: q = r, `NITER` power iterations; O(out *
in * r) instead of a full SVD's O(out * in * min(out, in)), which matters at 7B), split evenly:
B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T / sqrt(s), so that s B A = U S V^T. All in fp32.

Trade-off: the per-layer SVD makes loading slower (seconds for a 135M model), and a changed base
is no longer the public checkpoint, so training saves it beside the adapter (`<run>/base/`, a
bitsandbytes-format 4-bit folder that the adapter's `base_model_name_or_path` names) and eval,
generate and merge load that one.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.adapters.spec import LoraSpec
from qlora.errors import UsageError
from qlora.nn.adapter import adapter_layers
from qlora.nn.linear4bit import Linear4bit
from qlora.quant.format import QuantFormat

NITER = 4  # power iterations of svd_lowrank: torch's default (2) leaves ~1% more error at r=16 here

Factors = tuple[torch.Tensor, torch.Tensor]


def lowrank_factors(m: torch.Tensor, r: int, scaling: float) -> Factors:
    """(A (r, in), B (out, r)) fp32 with scaling * B @ A the randomised rank-r SVD of `m` (out, in)."""
    u, s, v = torch.svd_lowrank(m.float(), q=r, niter=NITER)  # m ~ u diag(s) v^T
    root = (s / scaling).sqrt()
    return root[:, None] * v.T, u * root[None, :]


def init_layer(weight: torch.Tensor, bias: torch.Tensor | None, fmt: QuantFormat, spec: LoraSpec,
               name: str = "weight") -> tuple[Linear4bit, Factors]:
    """The 4-bit base and the adapter's (A, B) for one (out, in) `weight` (see module docstring)."""
    out_features, in_features = weight.shape
    if spec.r > min(out_features, in_features):
        raise UsageError(f"lora.r={spec.r} with lora.init={spec.init!r}: {name} is {out_features} x {in_features}, "
                         f"so the rank can be at most {min(out_features, in_features)}")
    w = weight.float()
    if spec.init == "pissa":
        a, b = lowrank_factors(w, spec.r, spec.scaling)
        return Linear4bit.quantize((w - spec.scaling * b @ a).to(weight.dtype), fmt, bias), (a, b)
    if spec.init != "loftq":
        raise UsageError(f"lora.init={spec.init!r}; expected one of 'loftq', 'pissa' here")
    low = torch.zeros_like(w)
    for t in range(spec.loftq_iters):
        base = Linear4bit.quantize(weight if t == 0 else (w - low).to(weight.dtype), fmt, bias)
        a, b = lowrank_factors(w - base.dequantize().float(), spec.r, spec.scaling)
        low = spec.scaling * b @ a
    return base, (a, b)


def save_base(model: nn.Module, out_dir, source) -> None:
    """Write the (adapted) model's 4-bit base as a bitsandbytes-format folder (`export_quantized`)."""
    from qlora.adapters.surgery import bases_only
    from qlora.hf.export import export_quantized
    from qlora.hf.folder import model_folder

    with bases_only(model):
        export_quantized(model, out_dir, model_folder(source), overwrite=True)


class AdapterInit:
    """The loader's per-layer hook: `(model, fqn, weight, bias) -> Linear4bit`.

    Target layers (`spec.targets`, as `apply_lora` selects them) get `init_layer`; their factors are
    kept in `factors` until `apply_factors` copies them into the adapter layers. Other layers are
    quantised as usual.
    """

    def __init__(self, spec: LoraSpec, fmt: QuantFormat) -> None:
        self.spec, self.fmt = spec, fmt
        self.factors: dict[str, Factors] = {}
        self._targets: set[str] | None = None

    def __call__(self, model: nn.Module, fqn: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit:
        if self._targets is None:  # the first layer: the shells of all target linears exist now
            from qlora.adapters.surgery import lora_filter

            keep = lora_filter(model, self.spec.targets)
            self._targets = {name for name, m in model.named_modules() if keep(m, name)}
        if fqn not in self._targets:
            return Linear4bit.quantize(weight, self.fmt, bias)
        layer, self.factors[fqn] = init_layer(weight, bias, self.fmt, self.spec, f"{fqn}.weight")
        return layer

    @torch.no_grad()
    def apply_factors(self, model: nn.Module) -> None:
        """Copy the kept (A, B) into the model's adapter layers (after `apply_lora`)."""
        layers = adapter_layers(model)
        for fqn, (a, b) in self.factors.items():
            layer = layers[fqn]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            if hasattr(layer, "reset_magnitude"):  # DoRA: m = ||W + s B A||_row again
                layer.reset_magnitude()
        self.factors.clear()
