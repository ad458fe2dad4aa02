"""The small protocol every adapter layer follows, and the roles of its trainable tensors.

An adapter layer wraps a frozen linear-like `base` and adds a trainable low-rank update. The rest
of qlora never looks at parameter names to find out what a tensor is; it asks the layer:

    trainable_parameters()  {local name: (parameter, Role)}: what the optimiser trains and how
                            (LoRA+ gives Role.B a larger lr; weight decay goes to Role.A / Role.B
                            only; a DoRA magnitude vector or AdaLoRA's singular values get roles
                            of their own)
    delta_weight()          the fp32 (out, in) update the adapter adds to the base weight
    merge() / unmerge()     fold the update into a floating-point base weight and back
    disabled                when True the layer computes base(x) only

LoRA variants are new classes that follow this protocol beside `LoRALinear`; `adapter_layers`,
the optimiser's parameter groups and the surgery that freezes everything else then work unchanged.
"""

from __future__ import annotations

import enum
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn


class Role(str, enum.Enum):
    """What a trainable adapter tensor is, for the optimiser."""

    A = "lora_A"  # down-projection (in -> r)
    B = "lora_B"  # up-projection (r -> out); LoRA+ scales its learning rate
    MAGNITUDE = "magnitude"  # a per-output-feature scale (DoRA); no weight decay
    SINGULAR = "lora_E"  # AdaLoRA's singular values (r, 1); no weight decay
    OTHER = "other"

    @property
    def decays(self) -> bool:
        """Whether weight decay applies (the low-rank factors only)."""
        return self in (Role.A, Role.B)


@runtime_checkable
class AdapterLayer(Protocol):
    """A frozen `base` plus a trainable update (see module docstring)."""

    base: nn.Module
    disabled: bool

    def trainable_parameters(self) -> dict[str, tuple[nn.Parameter, Role]]: ...

    def delta_weight(self) -> torch.Tensor: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of `model` by its full name, in model order."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_with_roles(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Role]]:
    """(full name, parameter, role) of every trainable parameter; those outside adapter layers
    (a bias or norm a user unfroze) are Role.OTHER."""
    seen: set[int] = set()
    for fqn, layer in adapter_layers(model).items():
        for name, (param, role) in layer.trainable_parameters().items():
            seen.add(id(param))
            if param.requires_grad:
                yield f"{fqn}.{name}", param, role
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            yield name, param, Role.OTHER
