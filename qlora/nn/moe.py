"""Mixture-of-experts layers: one experts forward for 4-bit stores and expert LoRA, and `ExpertLoRA`.

Every transformers 5 MoE family decorates its experts class with `use_experts_implementation`,
which dispatches the forward through transformers' registry (`ExpertsInterface`, chosen by
``config._experts_implementation``). qlora registers one more implementation, ``"qlora"``, and
selects it on models whose experts are 4-bit (`qlora.nn.experts4bit.Experts4bit`) or carry LoRA.
The family's own module stays in place with its activation, gate (`_apply_gate`, e.g. gpt-oss'
clamped SwiGLU), biases and layout flags, so no family needs code of its own.

The forward groups the (token, slot) pairs by expert and runs each routed expert's group through
one matmul per projection (a loop over the experts that received tokens; on CPU that is as fast
as a grouped GEMM, and it decodes only those experts):

    x_e = tokens routed to e                                   (n_e, H)
    h   = gate(x_e @ W_up_e.T [+ s (x_e A_e.T) B_e.T])         (n_e, I)
    y_e = h @ W_down_e.T [+ s (h A'_e.T) B'_e.T]               (n_e, H)
    out = sum over the k slots of  routing weight * y_e        (T, H)

Expert LoRA follows PEFT 0.21's `ParamWrapper` for a 3-D parameter: per adapted parameter
``lora_A`` (r*E, in) and ``lora_B`` (out, r*E); expert e uses A_e = lora_A[e*r:(e+1)*r] and
B_e = lora_B[:, e::E] (PEFT reshapes B as (out, r, E)), so the update of expert e is
s * B_e @ A_e with s = alpha / r (alpha / sqrt(r) with rsLoRA). A second adapted parameter of
the same module wraps the first (``experts.base_layer.lora_A...``), as PEFT nests its wrappers.
The wrappers do not compute anything themselves: their forward marks them active (a context
variable, so gradient-checkpoint recomputes see them too) and calls the experts module, whose
forward adds each active adapter's update expert by expert. PEFT refuses dropout on parameter
targets (it cannot factor x out of B A dropout(x) per expert), and so do we.
"""

from __future__ import annotations

import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.adapter import Role
from qlora.nn.experts4bit import Experts4bit
from qlora.errors import UsageError
from qlora.nn.lora import _check_hyperparameters, add_delta, lora_delta, plus_update

IMPLEMENTATION = "qlora"
# Note: on the CPU each expert's group is padded to a multiple of CPU_ROWS rows. oneDNN caches a
# primitive (and its scratch memory) per matmul shape, and routed group sizes change every step,
# so unpadded groups grow the cache by several shapes per expert, projection and step (measured on
# a 4-layer, 8-expert model: 526 MB RssAnon after one training step unpadded, 291 MB padded);
# padding bounds the shapes. On CUDA nothing is padded.
CPU_ROWS = 32
_ACTIVE: contextvars.ContextVar[tuple["ExpertLoRA", ...]] = contextvars.ContextVar("qlora_expert_lora", default=())


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (decorated by use_experts_implementation)."""
    if isinstance(module, ExpertLoRA):
        return False
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The fused 3-D weights of an experts module: gate_up_proj (or up_proj) and down_proj."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def linear_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, out, in) of an expert weight in nn.Linear orientation, whatever its layout."""
    weight = getattr(module, name)
    if isinstance(weight, Experts4bit):
        return tuple(weight.shape)  # stored in linear orientation
    e, a, b = weight.shape
    return (e, b, a) if module.is_transposed else (e, a, b)


def expert_weight(module: nn.Module, name: str, e: int) -> torch.Tensor:
    """Expert ``e``'s (out, in) weight of parameter ``name``: a view, or decoded from 4 bits."""
    weight = getattr(module, name)
    if isinstance(weight, Experts4bit):
        return weight.dequantize(e)
    return weight[e].t() if module.is_transposed else weight[e]


def set_fused_weight(module: nn.Module, name: str, stack: torch.Tensor) -> None:
    """Make ``stack`` (E, out, in), in nn.Linear orientation, the module's frozen fused parameter
    ``name`` in its own layout (transposed for gpt-oss), replacing a 4-bit store if there is one."""
    module._modules.pop(name, None)
    module._parameters[name] = nn.Parameter(stack.transpose(1, 2).contiguous() if module.is_transposed else stack,
                                            requires_grad=False)


def quantize_experts(module: nn.Module, fmt) -> None:
    """Replace the module's fused 16-bit expert weights by `Experts4bit` stores, in place (the loader
    does the same expert by expert as the checkpoint streams in: qlora.hf.experts)."""
    for name in expert_parameter_names(module):
        stack = module._parameters.pop(name).detach()
        setattr(module, name, Experts4bit.quantize(stack.transpose(1, 2) if module.is_transposed else stack, fmt))


def _project(module: nn.Module, name: str, x: torch.Tensor, e: int, updates: list) -> torch.Tensor:
    """x @ W_e.T (+ bias_e) (+ each active adapter's update) for the routed tokens x of expert e.

    ``updates``: (parameter name, per-expert A's, per-expert B's, scaling) of the active adapters.
    """
    weight = getattr(module, name)
    if isinstance(weight, Experts4bit):
        y = weight.linear(x, e)
    else:
        y = F.linear(x, weight[e].t() if module.is_transposed else weight[e])
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[e].to(y.dtype)
    for target, lora_A, lora_B, scaling in updates:
        if target == name:
            y = plus_update(y, F.linear(x.to(lora_A[e].dtype), lora_A[e]), lora_B[e], scaling)
    return y


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "qlora" experts implementation (see module docstring): (T, H) -> (T, H)."""
    # Note: the per-expert factors come from one `unbind` per adapter and step, whose backward is
    # one stack; slicing lora_A / lora_B per expert would give E full-size gradient buffers.
    updates = [(a.parameter_name, *a.per_expert_factors(), a.scaling)
               for a in _ACTIVE.get() if a.experts is self and not a.disabled]
    num_tokens, k = top_k_index.shape
    slots = top_k_index.reshape(-1)
    order = torch.argsort(slots, stable=True)  # (T*k,) slots grouped by expert
    counts = torch.bincount(slots, minlength=self.num_experts).tolist()
    # Note: one `split` (its backward is one cat); slicing per expert would make the backward
    # allocate and add a zero gradient the size of the whole gathered batch for every expert.
    groups = hidden_states[order // k].split(counts)
    up = expert_parameter_names(self)[0]
    rows = CPU_ROWS if hidden_states.device.type == "cpu" else 1
    outputs = []
    for e, x in enumerate(groups):
        n = x.shape[0]
        if n == 0:
            continue
        if n % rows:
            x = F.pad(x, (0, 0, 0, rows - n % rows))  # zero rows, cut off below: their gradients are zero
        h = _project(self, up, x, e, updates)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        outputs.append(_project(self, "down_proj", h, e, updates)[:n])
    y = torch.cat(outputs)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y[inverse].view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def register() -> None:
    """Add the "qlora" experts implementation to transformers' registry (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def use_qlora_experts(model: nn.Module) -> int:
    """Route every experts module of ``model`` through `experts_forward`; returns how many."""
    register()
    modules = [m for m in model.modules() if is_experts(m)]
    for module in modules:
        module.config._experts_implementation = IMPLEMENTATION
    return len(modules)


def expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int,
                   e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e (r, in), B_e (out, r)) of expert ``e`` from PEFT's lora_A (r*E, in) and lora_B (out, r*E)."""
    r = lora_A.shape[0] // num_experts
    return lora_A[e * r : (e + 1) * r], lora_B[:, e::num_experts]


def expert_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int, scaling: float) -> torch.Tensor:
    """The fp32 (E, out, in) update s * B_e @ A_e of every expert."""
    return torch.stack([lora_delta(*expert_factors(lora_A, lora_B, num_experts, e), scaling)
                        for e in range(num_experts)])


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, ExpertLoRA):
        module = module.base_layer
    return module


class ExpertLoRA(nn.Module):
    """LoRA on one fused expert parameter of an experts module (PEFT's ParamWrapper layout).

    Args:
        base_layer: the experts module, or another `ExpertLoRA` around it (nesting, as PEFT).
        parameter_name: ``gate_up_proj`` / ``up_proj`` / ``down_proj``.
        r, alpha, use_rslora, dtype: as `LoRALinear` (no dropout: see module docstring).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float,
                 use_rslora: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_hyperparameters(r, alpha, 0.0)
        self.base_layer = base_layer.requires_grad_(False)
        self.parameter_name = parameter_name
        experts = _innermost(base_layer)
        self.num_experts, self.out_features, self.in_features = linear_shape(experts, parameter_name)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = next((b.device for b in experts.buffers()), None) or next(experts.parameters()).device
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False
        self.merged = False

    @property
    def experts(self) -> nn.Module:
        return _innermost(self.base_layer)

    @property
    def base(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.base_layer, name)  # num_experts, config, ... of the wrapped module

    def trainable_parameters(self) -> dict[str, tuple[nn.Parameter, Role]]:
        return {"lora_A.weight": (self.lora_A.weight, Role.A), "lora_B.weight": (self.lora_B.weight, Role.B)}

    def factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e (r, in), B_e (out, r)) of expert ``e``."""
        return expert_factors(self.lora_A.weight, self.lora_B.weight, self.num_experts, e)

    def per_expert_factors(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(A_0 .. A_{E-1}) each (r, in) and (B_0 .. B_{E-1}) each (out, r), as views (see `factors`)."""
        lora_A = self.lora_A.weight.view(self.num_experts, self.r, self.in_features).unbind(0)
        lora_B = self.lora_B.weight.view(self.out_features, self.r, self.num_experts).permute(2, 0, 1).unbind(0)
        return lora_A, lora_B

    def forward(self, *args, **kwargs):
        token = _ACTIVE.set(_ACTIVE.get() + (self,))
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def delta_weight(self) -> torch.Tensor:
        """The fp32 (E, out, in) update, expert by expert (nn.Linear orientation)."""
        return expert_delta(self.lora_A.weight, self.lora_B.weight, self.num_experts, self.scaling)

    @torch.no_grad()
    def merged_experts(self, dtype: torch.dtype) -> nn.Module:
        """The experts module with every adapter of this chain folded into 16-bit weights:
        W_e' = round(dequant(W_e) + s B_e A_e) per expert (fp32 sum, one rounding), in the
        module's own layout; the module is changed in place and returned, unwrapped."""
        layers, module = [], self
        while isinstance(module, ExpertLoRA):
            layers.append(module)
            module = module.base_layer
        for layer in layers:
            weight = torch.stack([expert_weight(module, layer.parameter_name, e).float()
                                  for e in range(layer.num_experts)])
            set_fused_weight(module, layer.parameter_name, add_delta(weight, layer.delta_weight(), dtype))
        return module

    def merge(self) -> None:
        raise UsageError("ExpertLoRA.merge: expert adapters are folded by merged_experts() (a new weight)")

    def unmerge(self) -> None:
        raise UsageError("ExpertLoRA.unmerge: expert adapters are never merged in place")

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}")
