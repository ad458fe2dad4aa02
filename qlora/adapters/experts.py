"""LoRA on fused expert parameters (`lora.target_parameters`), in PEFT's `target_parameters` format.

A recipe names expert parameters as PEFT does, by suffixes of their full names
(``mlp.experts.gate_up_proj``), or with the shorthand ``all-experts`` (every fused expert weight:
gate_up_proj / up_proj and down_proj of every experts module). Each experts module gets one
`qlora.nn.moe.ExpertLoRA` per adapted parameter, the first listed innermost, as PEFT nests its
`ParamWrapper`s, so the adapter keys are PEFT's (``experts.lora_A.weight`` for the outer,
``experts.base_layer.lora_A.weight`` for the inner). Routers are never targets: they stay 16-bit
and frozen. Shared experts are ordinary linears, adapted through ``lora.targets``.

What PEFT cannot do on parameters, qlora refuses too, naming the key: dropout, DoRA, AdaLoRA and
LoftQ / PiSSA initialisation.
"""

from __future__ import annotations

from torch import nn

from qlora.adapters.spec import LoraSpec
from qlora.dtypes import torch_dtype
from qlora.errors import UsageError
from qlora.nn.moe import ExpertLoRA, expert_parameter_names, is_experts, use_qlora_experts
from qlora.nn.swap import name_matches

ALL_EXPERTS = "all-experts"


def expert_targets(model: nn.Module, target_parameters: str | tuple[str, ...]) -> dict[str, list[str]]:
    """Experts module name -> the parameters to adapt, innermost first.

    An experts module already wrapped in `ExpertLoRA`s is named by its outermost wrapper.
    """
    modules = {_unwrapped_name(fqn): m for fqn, m in model.named_modules() if is_experts(m)}
    available = sorted({f"{fqn.rpartition('.')[2]}.{name}" for fqn, m in modules.items()
                        for name in expert_parameter_names(m)})
    if target_parameters == ALL_EXPERTS:
        if not modules:
            raise UsageError(f"lora.target_parameters: {ALL_EXPERTS!r}, but the model has no fused experts "
                             "(a dense model: use lora.targets)")
        return {fqn: expert_parameter_names(m) for fqn, m in modules.items()}
    if isinstance(target_parameters, str):
        raise UsageError(f"lora.target_parameters={target_parameters!r}; expected {ALL_EXPERTS!r} or a list "
                         "of parameter names such as ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")
    chosen: dict[str, list[str]] = {}
    for entry in target_parameters:
        hits = [(fqn, name) for fqn, m in modules.items() for name in expert_parameter_names(m)
                if name_matches(f"{fqn}.{name}", (entry,))]
        if not hits:
            raise UsageError(f"lora.target_parameters: {entry!r} matches no fused expert parameter; "
                             f"available: {available or 'none (the model has no experts)'}")
        for fqn, name in hits:
            if name not in chosen.setdefault(fqn, []):
                chosen[fqn].append(name)
    return chosen


def _unwrapped_name(fqn: str) -> str:
    while fqn.endswith(".base_layer"):
        fqn = fqn.removesuffix(".base_layer")
    return fqn


def _refuse_variants(spec: LoraSpec) -> None:
    refused = {"lora.dropout": spec.dropout > 0, "lora.use_dora": spec.use_dora,
               "lora.use_adalora": spec.adalora is not None, "lora.init": spec.init != "default"}
    for key, bad in refused.items():
        if bad:
            raise UsageError(f"{key}: not available with lora.target_parameters (expert LoRA, as PEFT's "
                             "ParamWrapper, supports plain LoRA and rsLoRA only); set it to its default "
                             "or adapt linears only")


def apply_expert_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap the targeted experts modules in `ExpertLoRA`s; returns ``<module>.<parameter>`` names."""
    if not spec.target_parameters:
        return []
    _refuse_variants(spec)
    adapted = []
    for fqn, names in expert_targets(model, spec.target_parameters).items():
        wrapped = model.get_submodule(fqn)
        for name in names:
            wrapped = ExpertLoRA(wrapped, name, spec.r, spec.alpha, spec.use_rslora, torch_dtype(spec.dtype))
            adapted.append(f"{fqn}.{name}")
        parent, _, leaf = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    use_qlora_experts(model)
    return adapted


def parameter_suffixes(model: nn.Module) -> list[str]:
    """PEFT's `target_parameters` for the adapted experts: ``<module leaf>.<parameter>``, innermost first."""
    suffixes: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, ExpertLoRA) or fqn.endswith(".base_layer"):
            continue  # an inner wrapper: its outermost one walks the chain
        chain, layer = [], module
        while isinstance(layer, ExpertLoRA):
            chain.append(layer.parameter_name)
            layer = layer.base_layer
        leaf = fqn.rpartition(".")[2]
        for name in reversed(chain):
            parts = fqn.split(".")
            suffix = f"{parts[-2]}.{leaf}.{name}" if len(parts) > 1 else f"{leaf}.{name}"
            if suffix not in suffixes:
                suffixes.append(suffix)
    return suffixes
