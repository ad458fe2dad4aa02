"""The reference policy of preference tuning, with no second copy of the model.

    no model.adapter    the reference is the 4-bit base with every adapter layer switched off
                        (`qlora.inference.generate.adapters_disabled`: one flag per layer, the base weights are shared)
    model.adapter: DIR  the policy starts as a trainable copy of DIR's adapter (`start_from_adapter`)
                        and the reference is DIR's adapter, frozen, on the same layers: an
                        `AdapterSet` holds both and a switch is a pointer swap (no copy of the base,
                        r * (in + out) adapter values per layer more)

This is TRL's PEFT setup (adapters disabled, or its frozen "ref" adapter) without a PEFT wrapper.
The reference forward runs under `torch.no_grad()`; the base's activations are not kept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import nn

from qlora.adapters.multi import AdapterSet
from qlora.adapters.peft_format import WEIGHTS_FILE, load_adapter_weights, read_adapter_weights
from qlora.adapters.spec import LoraSpec, read_peft_config
from qlora.errors import UsageError
from qlora.inference.generate import adapters_disabled

POLICY, REFERENCE = "policy", "reference"


def _same_base(a: str, b: str) -> bool:
    """Whether two model names / folders are one base (built-in names as their cached folders)."""
    from qlora.hf.embedded import builtin_folder

    a, b = builtin_folder(a), builtin_folder(b)
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_adapter_base(adapter: str, name_or_path: str) -> None:
    """`model.adapter` was trained on `model.name_or_path` (its adapter_config.json says so)."""
    base = read_peft_config(adapter).get("base_model_name_or_path")
    if base and not _same_base(str(base), name_or_path):
        raise UsageError(f"model.adapter: {adapter!r} adapts the base {base!r}, not model.name_or_path "
                         f"{name_or_path!r}; a starting / reference adapter must belong to the same base")


def start_from_adapter(model: nn.Module, adapter: str, name_or_path: str, adalora: bool = False) -> None:
    """Copy the weights of the adapter folder `adapter` into the model's adapter layers."""
    check_adapter_base(adapter, name_or_path)
    load_adapter_weights(model, read_adapter_weights(adapter, as_lora=not adalora), Path(adapter) / WEIGHTS_FILE)


class FrozenAdapterReference:
    """The reference is a frozen copy of the adapter folder `adapter` on the policy's own layers."""

    def __init__(self, model: nn.Module, adapter: str, spec: LoraSpec) -> None:
        self.adapters = AdapterSet(model, spec.dtype)
        self.adapters.adopt(POLICY, spec)
        self.adapters.load_adapter(adapter, REFERENCE)
        self.adapters.set_adapter(POLICY)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.adapters.set_adapter(REFERENCE)
        try:
            yield
        finally:
            self.adapters.set_adapter(POLICY)


def reference_for(model: nn.Module, adapter: str | None, spec: LoraSpec):
    """A zero-argument context-manager factory: inside it the model computes the reference policy."""
    if adapter is None:
        return lambda: adapters_disabled(model)
    return FrozenAdapterReference(model, adapter, spec)


def serving_reference(adapters: AdapterSet, start: str | None):
    """The reference of a run served by an `AdapterSet` (`qlora eval`): `start` (its model.adapter)
    loaded as a frozen adapter, else the base; inside the block the active adapter is switched off."""
    if start is not None and REFERENCE not in adapters.adapters:
        adapters.load_adapter(start, REFERENCE)

    @contextlib.contextmanager
    def reference() -> Iterator[None]:
        active = adapters.active
        adapters.set_adapter(REFERENCE if start is not None else None)
        try:
            yield
        finally:
            adapters.set_adapter(active)

    return reference
