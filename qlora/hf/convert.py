"""Which checkpoint tensors make each model tensor: transformers' own checkpoint-conversion mapping.

A hub checkpoint does not always name tensors as the module tree does. transformers 5 keeps, per
model family, a list of `WeightRenaming`s (gpt_neox's ``embed_out`` -> ``lm_head``, Mixtral's
``block_sparse_moe`` -> ``mlp``) and `WeightConverter`s (one 2-D tensor per expert in the file,
one fused 3-D parameter in the model). `from_pretrained` applies them while loading; this module
asks the same mapping (`get_model_conversion_mapping`, `rename_source_key`) which model tensor each
checkpoint key feeds, so no family needs a rule of its own here.

The result, `Sources`, maps each model tensor to its `Piece`s:

    dense / renamed tensor            one Piece (expert=None)
    fused experts in the checkpoint   one Piece holding the whole (E, ...) stack (expert=None)
    per-expert checkpoint tensors     E x P Pieces: expert e, part p of P source patterns

A converter's operations are read, not re-implemented: `MergeModulelist(dim=0)` stacks the
experts (the expert index is the key's position in transformers' natural key order, as
`from_pretrained` stacks them) and an optional `Concatenate(dim=1)` joins the P source patterns
along the output rows of each expert (Mixtral's w1 then w3 -> gate_up_proj). Because each expert's
2-D slice is known, the loader can quantise it as it arrives; the 16-bit stack of a layer never
exists. A converter with other operations is refused naming it (none of transformers' causal-LM
MoE families uses one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from qlora.errors import UsageError


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor and where it lands in its model tensor."""

    key: str
    expert: int | None = None
    """Index along dim 0 of a stacked experts parameter; None: the piece is the whole tensor."""
    part: int = 0
    """Which source pattern of a concatenation (its position in the converter's list)."""


@dataclass
class Sources:
    """Model tensor name -> its pieces, plus the checkpoint keys nothing uses."""

    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def keys_of(self, fqn: str) -> list[str]:
        return [p.key for p in self.pieces.get(fqn, [])]

    def stacked(self, fqn: str) -> bool:
        """Whether ``fqn`` is assembled from per-expert checkpoint tensors."""
        return any(p.expert is not None for p in self.pieces.get(fqn, []))


_SUPPORTED_OPS = (("MergeModulelist",), ("MergeModulelist", "Concatenate"))


def _check_converter(converter) -> None:
    ops = tuple(type(op).__name__ for op in converter.operations)
    dims = tuple(getattr(op, "dim", None) for op in converter.operations)
    if ops not in _SUPPORTED_OPS or dims not in ((0,), (0, 1)):
        raise UsageError(
            f"checkpoint conversion {converter.source_patterns} -> {converter.target_patterns} uses "
            f"operations {ops} (dims {dims}); qlora streams only expert stacking (MergeModulelist dim 0) "
            "and gate/up concatenation (Concatenate dim 1)"
        )


def _natural_order(keys: Iterable[str]) -> list[str]:
    from transformers.core_model_loading import dot_natural_key

    return sorted(keys, key=dot_natural_key)


def checkpoint_sources(model: nn.Module, expected: Iterable[str], checkpoint_keys: Iterable[str]) -> Sources:
    """Map every checkpoint key to the model tensor it feeds, through transformers' mapping.

    ``expected``: the model's tensor names to fill (its state-dict keys less a tied head).
    Prefix differences (a bare-backbone checkpoint, an extra ``model.``) are handled as
    `from_pretrained` does. Keys that feed nothing are listed in ``Sources.unused``.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: conv for conv in converters for pattern in conv.source_patterns}
    wanted = dict.fromkeys(expected, True)  # `rename_source_key` asks `.get` of a state dict
    prefix = getattr(model, "base_model_prefix", None) or None
    sources = Sources()
    counts: dict[tuple[str, str], int] = {}
    for key in _natural_order(checkpoint_keys):
        name, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
        if name not in wanted and key in wanted:  # as from_pretrained: the key was right as it was
            name, pattern = rename_source_key(key, [], [], prefix, wanted)
        if name not in wanted:
            sources.unused.append(key)
            continue
        if pattern is None:
            sources.pieces.setdefault(name, []).append(Piece(key))
            continue
        converter = by_pattern[pattern]
        _check_converter(converter)
        expert = counts.get((name, pattern), 0)
        counts[(name, pattern)] = expert + 1
        sources.pieces.setdefault(name, []).append(Piece(key, expert, converter.source_patterns.index(pattern)))
    return sources


def expert_parts(pieces: list[Piece], num_experts: int, fqn: str) -> list[list[str]]:
    """The checkpoint keys of each expert, in concatenation order: [[key of part 0, part 1], ...].

    Refuses a stack that misses an expert or a part, naming the model tensor.
    """
    n_parts = 1 + max(p.part for p in pieces)
    grid: list[list[str | None]] = [[None] * n_parts for _ in range(num_experts)]
    for p in pieces:
        if p.expert is None or p.expert >= num_experts:
            raise UsageError(f"checkpoint tensor {p.key!r}: {fqn!r} has {num_experts} experts, "
                             f"but the checkpoint holds more")
        grid[p.expert][p.part] = p.key
    holes = [(e, part) for e, row in enumerate(grid) for part, k in enumerate(row) if k is None]
    if holes:
        raise UsageError(f"the checkpoint lacks expert {holes[0][0]} (part {holes[0][1]}) of {fqn!r}: "
                         f"{len(holes)} expert tensor(s) missing")
    return grid  # type: ignore[return-value]
