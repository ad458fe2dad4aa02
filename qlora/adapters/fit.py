"""An adapter's tensors against its config, and against the base model it is applied to.

Every command reads adapters through `qlora.adapters.peft_format.read_adapter_weights` and applies
them through `load_adapter` or `AdapterSet.load_adapter`, and each of those calls these checks, so
eval, generate, merge, combine and hot swap accept and refuse the same folders. They used to
differ: eval took the scaling alpha / r from the config and the rank from the tensors (a wrong `r`
gave a wrong loss, with no word), applied `target_modules` that disagreed with the tensors, and
evaluated an adapter with no tensors, or an ADALORA config over LoRA tensors, as the bare base.

`check_tensors(config, tensors, source)`, the folder alone (before any model loads):

    at least one adapter tensor; every tensor floating-point and finite (NaN / Inf named)
    LORA:    <m>.lora_A.weight (r, in) and <m>.lora_B.weight (out, r) in pairs, r = config r
             (+ <m>.lora_magnitude_vector with use_dora); AdaLoRA tensors refused
    ADALORA: <m>.lora_A (k, in), <m>.lora_E (k, 1), <m>.lora_B (out, k) with k = the kept
             triplets of rank_pattern (init_r without one); rank_pattern names no other module

`check_fits(model, modules, targets, source)`, against the base (a loaded model, or one built on
`meta` from the base's config, as combine does): each adapted module is a linear layer of the
base with the adapter's (in, out), and `target_modules` selects exactly the adapted modules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qlora.adapters.spec import PEFT_PREFIX
from qlora.adapters.surgery import LINEAR_LIKE, bases_only, lora_filter
from qlora.errors import UsageError
from qlora.hf.checks import check_tensor
from qlora.nn.swap import name_matches

_LORA = re.compile(r"^(?P<m>.+)\.(?P<f>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_ADALORA = re.compile(r"^(?P<m>.+)\.(?P<f>lora_A|lora_E|lora_B)$")


def _listed(names) -> str:
    names = sorted(names)
    return f"{names[:4]}{' ...' if len(names) > 4 else ''}"


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Every tensor is floating-point with no NaN / Inf, or a UsageError naming the first that is not."""
    for key, tensor in tensors.items():
        check_tensor(key, source, tensor, floating=True)


def check_tensors(config: dict, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """The folder's tensors agree with its (already field-checked) config; see the module docstring."""
    if not tensors:
        raise UsageError(f"{source}: holds no tensors; expected the adapter's lora_A / lora_B weights")
    check_finite(tensors, source)
    adalora = config.get("peft_type") == "ADALORA"
    form, other = (_ADALORA, _LORA) if adalora else (_LORA, _ADALORA)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = form.match(key)
        if match is None or not key.startswith(PEFT_PREFIX):
            kind = "a LoRA" if adalora else "an AdaLoRA"
            what = f"{kind} tensor, but the config says {config.get('peft_type')}" if other.match(key) else \
                "not an adapter tensor PEFT names"
            raise UsageError(f"{source}: tensor {key!r} is {what}")
        groups.setdefault(match["m"].removeprefix(PEFT_PREFIX), {})[match["f"]] = tensor
    if adalora:
        _check_adalora(config, groups, source)
    else:
        _check_lora(config, groups, source)


def expert_fqns(fqns, target_parameters) -> set[str]:
    """The adapted modules that are experts modules (PEFT `target_parameters`), nested wrappers
    (``experts.base_layer``) included."""
    if not target_parameters:
        return set()
    owners = ("experts",) if isinstance(target_parameters, str) else \
        tuple(t.rpartition(".")[0] or t for t in target_parameters)
    return {fqn for fqn in fqns if name_matches(re.sub(r"(\.base_layer)+$", "", fqn), owners)}


def _check_lora(config: dict, groups: dict[str, dict[str, torch.Tensor]], source) -> None:
    r, dora = config["r"], bool(config.get("use_dora"))
    experts = expert_fqns(groups, config.get("target_parameters"))
    for fqn, parts in groups.items():
        if {"lora_A.weight", "lora_B.weight"} - parts.keys():
            raise UsageError(f"{source}: module {fqn!r} lacks {sorted({'lora_A.weight', 'lora_B.weight'} - parts.keys())}")
        if ("lora_magnitude_vector" in parts) != dora:
            raise UsageError(f"{source}: module {fqn!r} {'lacks' if dora else 'has'} a DoRA magnitude "
                             f"(lora_magnitude_vector), but use_dora is {str(dora).lower()}")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if fqn in experts:  # (r * experts, in) and (out, r * experts)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % r:
                raise UsageError(f"{source}: expert module {fqn!r} has lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)}; with r={r} expected (r x experts, in) and (out, r x experts)")
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UsageError(f"{source}: module {fqn!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                             f"but the config says r={r}; expected (r, in) and (out, r)")


def _check_adalora(config: dict, groups: dict[str, dict[str, torch.Tensor]], source) -> None:
    init_r, pattern = config["init_r"], config.get("rank_pattern") or {}
    unknown = {key.removesuffix(".lora_E") for key in pattern} - groups.keys()
    if unknown:
        raise UsageError(f"{source}: rank_pattern names modules with no tensors: {_listed(unknown)}")
    for fqn, parts in groups.items():
        if set(parts) != {"lora_A", "lora_E", "lora_B"}:
            raise UsageError(f"{source}: module {fqn!r} lacks {sorted({'lora_A', 'lora_E', 'lora_B'} - set(parts))}")
        a, e, b = parts["lora_A"], parts["lora_E"], parts["lora_B"]
        kept = sum(pattern[f"{fqn}.lora_E"]) if f"{fqn}.lora_E" in pattern else init_r
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != kept or tuple(e.shape) != (kept, 1) or b.shape[1] != kept:
            why = f"rank_pattern keeps {kept} of init_r = {init_r}" if f"{fqn}.lora_E" in pattern else f"init_r = {init_r}"
            raise UsageError(f"{source}: module {fqn!r} has lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, "
                             f"lora_B {tuple(b.shape)}, but {why}; expected ({kept}, in), ({kept}, 1), (out, {kept})")


def check_fits(model: nn.Module, modules: Mapping[str, tuple[int, int]], targets, source: str | Path,
               target_parameters=()) -> None:
    """The adapted `modules` (fqn -> (in, out)) exist in `model` and `targets` selects exactly them;
    expert modules (`target_parameters`) are checked against the model's fused expert weights."""
    experts = expert_fqns(modules, target_parameters)
    if experts:
        _check_expert_fits(model, {f: modules[f] for f in experts}, target_parameters, source)
        modules = {f: shape for f, shape in modules.items() if f not in experts}
    with bases_only(model):
        linear = {fqn: m for fqn, m in model.named_modules() if isinstance(m, LINEAR_LIKE)}
        absent = set(modules) - set(linear)
        if absent:
            raise UsageError(f"{source}: the adapter has tensors for modules the base model does not have "
                             f"(or that are not linear layers): {_listed(absent)}")
        for fqn, shape in modules.items():
            layer = linear[fqn]
            if shape != (layer.in_features, layer.out_features):
                raise UsageError(f"{source}: module {fqn!r} is {shape[0]} -> {shape[1]} in the adapter, but "
                                 f"{layer.in_features} -> {layer.out_features} in the base model")
        try:
            keep = lora_filter(model, targets)
        except UsageError as err:
            raise UsageError(f"{source}: target_modules: {err}") from None
        selected = {fqn for fqn, m in model.named_modules() if keep(m, fqn)}
    if selected != set(modules):
        extra, lacking = set(modules) - selected, selected - set(modules)
        raise UsageError(f"{source}: target_modules {targets!r} disagrees with the tensors: "
                         + "; ".join(part for part in (
                             extra and f"tensors for modules it does not select {_listed(extra)}",
                             lacking and f"it selects modules with no tensors {_listed(lacking)}") if part))


def _check_expert_fits(model: nn.Module, modules: Mapping[str, tuple[int, int]], target_parameters,
                       source: str | Path) -> None:
    """Each expert adapter module is the wrapper PEFT nests for one targeted fused parameter, with
    that parameter's (in, out)."""
    from qlora.adapters.experts import expert_targets
    from qlora.nn.moe import linear_shape

    with bases_only(model):
        try:
            targets = expert_targets(model, tuple(target_parameters))
        except UsageError as err:
            raise UsageError(f"{source}: target_parameters: {err}") from None
        expected = {}
        for fqn, names in targets.items():
            module = model.get_submodule(fqn)
            for depth, name in enumerate(reversed(names)):  # the last listed is the outermost
                _, out_f, in_f = linear_shape(module, name)
                expected[fqn + ".base_layer" * depth] = (in_f, out_f)
    if expected != dict(modules):
        wrong = sorted(set(expected.items()) ^ set(dict(modules).items()))
        raise UsageError(f"{source}: the expert tensors do not fit the model's fused experts for target_parameters "
                         f"{list(target_parameters)}: {wrong[:3]} (module, (in, out)) differ")


def shapes(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """fqn -> (in, out) of LoRA (A, B) pairs."""
    return {fqn: (a.shape[1], b.shape[0]) for fqn, (a, b) in pairs.items()}


def meta_base(name_or_path: str) -> nn.Module:
    """The base model's modules on `meta` (no weights read), to check adapters against."""
    from qlora.hf.folder import load_config, model_folder
    from qlora.hf.load import _empty_model

    config = load_config(model_folder(name_or_path), False)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a 4-bit export: the same modules, built unquantised
    return _empty_model(config, torch.bfloat16, False)
