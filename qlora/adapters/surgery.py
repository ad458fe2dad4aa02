"""Attaching adapters to a loaded model, counting parameters, and preparing it to train.

Every structural change goes through `qlora.nn.swap.swap_modules`; target names follow the one
rule of `qlora.nn.swap.name_matches`. What is trainable afterwards is exactly what the adapter
layers declare (`trainable_parameters()`, the `AdapterLayer` protocol), never a guess from names.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

from torch import nn

from qlora.adapters.experts import apply_expert_lora
from qlora.adapters.spec import LoraSpec
from qlora.dtypes import torch_dtype
from qlora.errors import UsageError
from qlora.nn import Linear4bit, LoRALinear
from qlora.nn.adapter import adapter_layers
from qlora.nn.adalora import AdaLoRALinear
from qlora.nn.dora import DoRALinear
from qlora.nn.swap import ModuleFilter, name_matches, swap_modules

LINEAR_LIKE = (nn.Linear, Linear4bit)


def lora_filter(model: nn.Module, targets: str | Sequence[str]) -> ModuleFilter:
    """The ``(module, fqn) -> bool`` filter for LoRA targets.

    ``"all-linear"``: every nn.Linear / Linear4bit except the output projection (lm_head);
    ``"re:<regex>"``: linear-like modules whose full name matches the regex (``re.fullmatch``);
    a list of names: linear-like modules selected by ``name_matches`` (``q_proj``, ``mlp.up_proj``).
    Each named entry (and the regex) must match at least one module. Modules inside an adapter
    layer (its base, its A and B) are never targets.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = tuple(f"{fqn}." for fqn in adapter_layers(model))
    linear = {fqn: m for fqn, m in model.named_modules()
              if isinstance(m, LINEAR_LIKE) and not (inside and fqn.startswith(inside))}
    if targets == "all-linear":
        return lambda m, fqn: fqn in linear and m is not head
    if isinstance(targets, str) and targets.startswith("re:"):
        pattern = _compile(targets)
        tests = {targets: lambda fqn: pattern.fullmatch(fqn) is not None}
    elif isinstance(targets, str):
        raise UsageError(f"lora targets={targets!r}; expected 'all-linear', 're:<regex>' or a list of module names")
    else:
        tests = {t: (lambda fqn, t=t: name_matches(fqn, (t,))) for t in targets}
    for target, test in tests.items():
        if not any(test(fqn) for fqn in linear):
            leaves = sorted({fqn.rpartition(".")[2] for fqn in linear})
            raise UsageError(f"lora target {target!r} matches no linear module; available names: {leaves}")
    return lambda m, fqn: fqn in linear and any(test(fqn) for test in tests.values())


def _compile(targets: str) -> re.Pattern:
    try:
        return re.compile(targets[3:])
    except re.error as err:
        raise UsageError(f"lora targets={targets!r}: not a valid regular expression ({err})") from None


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap the target linear modules in ``LoRALinear`` (``DoRALinear`` with ``use_dora``,
    ``AdaLoRALinear`` with ``adalora``) and the targeted expert parameters in ``ExpertLoRA``
    (``spec.target_parameters``, qlora.adapters.experts) per ``spec``; freeze all but the adapters.

    Returns the wrapped modules' full names. See ``lora_filter`` for ``spec.targets``.
    """
    keep = lora_filter(model, spec.targets)
    dtype = torch_dtype(spec.dtype)
    layer = DoRALinear if spec.use_dora else AdaLoRALinear if spec.adalora else LoRALinear
    wrapped = swap_modules(model, keep, lambda m: layer(m, spec.r, spec.alpha, spec.dropout, spec.use_rslora, dtype))
    wrapped += apply_expert_lora(model, spec)
    model.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for param, _ in layer.trainable_parameters().values():
            param.requires_grad_(True)
    return wrapped


@contextlib.contextmanager
def bases_only(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every adapter layer replaced by its base for the `with` block (to export the
    base as it is being trained on), then the adapter layers put back."""
    layers = adapter_layers(model)
    swap_modules(model, lambda m, fqn: fqn in layers, lambda m: m.base)
    try:
        yield model
    finally:
        for fqn, layer in layers.items():
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent), name, layer)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its logical out*in elements."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights count once
                continue
            seen.add(id(param))
            n = module.in_features * module.out_features if isinstance(module, Linear4bit) and name == "weight" else param.numel()
            total += n
            trainable += n if param.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """``trainable params: X || all params: Y || trainable%: Z``, PEFT's wording.

    4-bit weights count as their logical number of weights (out x in), as PEFT counts bitsandbytes
    ``Params4bit``, not as the packed bytes; tied weights count once.
    """
    trainable, total = count_params(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True, upcast_norms: bool = False) -> nn.Module:
    """Get a loaded (and LoRA-wrapped) model ready to train.

    Gradient checkpointing uses the non-reentrant variant, which propagates gradients to the
    adapters even though the embedding output does not require grad, so ``enable_input_require_grads``
    (needed by the reentrant variant that PEFT falls back to) is not needed. The KV cache is turned off.

    Norms stay in the compute dtype by default. PEFT's ``prepare_model_for_kbit_training`` upcasts
    norms, embeddings and lm_head to fp32: a little more stable in fp16, but it costs memory, casts
    on every layer and fp32 logits. ``upcast_norms=True`` keeps the cheap part of that trade (norm
    weights in fp32; the norms then compute and return fp32, which the next linear casts back).
    """
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if upcast_norms:
        for module in model.modules():
            if type(module).__name__.lower().endswith("norm") or isinstance(module, nn.LayerNorm):
                module.float()
    return model
