"""Model surgery primitives: one post-order module swap and one rule for naming modules.

`swap_modules` is the only way qlora changes a model's structure (Conv1D -> Linear, Linear ->
Linear4bit, linear -> LoRA layer, LoRA layer -> merged Linear). It is driven by a
`(module, fqn) -> bool` filter: children are visited before their parent, so a replaced module is
never visited again, and the filter sees full dotted names as PEFT and transformers print them.

`name_matches` is the one rule by which a user's module names select modules (`quant.skip_modules`,
`lora.targets`): an entry matches when it is a run of whole dotted components of the full name, so
`q_proj`, `self_attn.q_proj` and `layers.0` all select `model.layers.0.self_attn.q_proj`, while
`proj` selects nothing.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

ModuleFilter = Callable[[nn.Module, str], bool]


def swap_modules(model: nn.Module, keep: ModuleFilter, build: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace, children first, every module with ``keep(module, fqn)`` by ``build(module)``.

    New modules are not visited again. Returns the replaced fully qualified names, in model order.
    """
    swapped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}{name}"
            visit(child, fqn + ".")
            if keep(child, fqn):
                setattr(parent, name, build(child))
                swapped.append(fqn)

    visit(model, "")
    return swapped


def name_matches(fqn: str, names: Iterable[str]) -> bool:
    """True when one of ``names`` is a run of whole dotted components of ``fqn``."""
    return any(f".{name}." in f".{fqn}." for name in names)
