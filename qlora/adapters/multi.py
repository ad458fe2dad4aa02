"""Several LoRA adapters on one (4-bit) base: load, hot swap, unload, and mixed-adapter batches.

One quantised base serving many fine-tunes is how QLoRA is used after training. `AdapterSet`
keeps every loaded adapter as its own (A, B) tensors per module and never copies or touches the
base weights:

    load_adapter(path, name)   read a PEFT folder; wrap the modules it adapts that are not yet
                               `LoRALinear` (the union of all loaded adapters' targets is wrapped);
                               loading never changes what the model computes
    set_adapter(name)          a pointer swap: every `LoRALinear` gets the named adapter's A and B
                               parameters and scaling (no copy, no allocation); the layers that
                               adapter does not adapt are `disabled`. `None` runs the base only.
    disabled()                 a block that runs the base, then restores the active adapter
    unload(name)               drop an adapter's tensors; unwrap modules no adapter adapts any more
    mixed(rows)                a block in which one forward over a batch uses adapter rows[i]
                               (None: the base) for row i

Cost. A switch is O(number of adapted modules) dict writes, independent of the adapters' size:
median 57 us (p99 171 us) for the 210 modules of the embedded 135M model on 2 shared cores
(`python -m tools.bench_adapters`). Memory grows by each adapter's tensors only (r * (in + out) per module in the adapter
dtype), plus one r=1 placeholder A and B per module the first time a module is wrapped.

Mixed batches. `LoRALinear.forward` computes one adapter for the whole batch, so in a `mixed`
block every layer runs as `disabled` (base only) and a forward hook adds the per-row updates,
grouping the rows by adapter:

    out = base(x);   for each adapter k the batch uses, with rows R_k:
        out[R_k] += s_k * B_k(A_k(x[R_k]))          what LoRALinear computes, on R_k only

Each row therefore equals that row run with its adapter (up to how the matmul blocks a
different number of rows; tested). A gathered batched matmul (stack the adapters zero-padded to
r_max, gather per row, two bmms) was measured ~3x slower on this CPU (bf16 bmm has no fast CPU
kernel: 8 x 64 tokens, 576 -> 1536, r=16, 4 adapters: bmm 17 ms, grouped 6 ms, one adapter for
all rows 1-3 ms), so the grouping costs one pair of small matmuls per adapter in the batch.
Generation works (each decoding step is a forward over the same rows); a batch whose rows are
reordered (beam search) is not supported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from qlora.adapters.experts import expert_targets
from qlora.adapters.fit import check_fits, shapes
from qlora.adapters.peft_format import lora_pairs, read_adapter_weights
from qlora.adapters.spec import LoraSpec, read_spec
from qlora.adapters.surgery import LINEAR_LIKE
from qlora.dtypes import torch_dtype
from qlora.errors import UsageError
from qlora.nn.lora import LoRALinear, plus_update
from qlora.nn.moe import ExpertLoRA, use_qlora_experts
from qlora.nn.swap import swap_modules

Pair = tuple[nn.Parameter, nn.Parameter]


@dataclass
class LoadedAdapter:
    """One loaded adapter: its spec, folder and (A, B) parameters by module name."""

    spec: LoraSpec
    path: Path
    pairs: dict[str, Pair]

    @property
    def attributes(self) -> dict:
        """What `set_adapter` writes into each layer it points at this adapter."""
        spec = self.spec
        return {"disabled": False, "r": spec.r, "alpha": spec.alpha, "use_rslora": spec.use_rslora,
                "scaling": spec.scaling}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.pairs.values() for t in pair)


class AdapterSet:
    """Named LoRA adapters on one model; at most one active (see the module docstring).

    Args:
        model: the base model (4-bit or not), with no adapter layers of its own.
        dtype: dtype of the adapters' tensors (`bf16`, `fp16`, `fp32`).
    """

    def __init__(self, model: nn.Module, dtype: str = "bf16") -> None:
        self.model = model
        self.dtype = torch_dtype(dtype)
        self.adapters: dict[str, LoadedAdapter] = {}
        self.active: str | None = None
        self._layers: dict[str, LoRALinear] = {}
        self._slots: dict[str, tuple[dict, dict, dict]] = {}  # see _point

    # --------------------------------------------------------------------------- load / unload
    def load_adapter(self, path: str | Path, name: str) -> list[str]:
        """Load the PEFT adapter folder `path` as `name`; returns the modules it adapts."""
        if name in self.adapters:
            raise UsageError(f"an adapter named {name!r} is already loaded (from {self.adapters[name].path})")
        spec, _ = read_spec(path)
        if spec.use_dora:
            raise UsageError(f"{path}: a DoRA adapter (use_dora); AdapterSet swaps LoRA adapters only "
                             "(load a DoRA adapter alone with qlora.adapters.peft_format.load_adapter)")
        pairs = lora_pairs(read_adapter_weights(path))
        check_fits(self.model, shapes(pairs), spec.targets, path, spec.target_parameters)
        self._wrap_experts(spec, Path(path))
        self._wrap(list(pairs), Path(path))
        self.adapters[name] = LoadedAdapter(spec, Path(path), {
            fqn: self._parameters(fqn, lora_A, lora_B, Path(path)) for fqn, (lora_A, lora_B) in pairs.items()})
        return list(pairs)

    def adopt(self, name: str, spec: LoraSpec) -> list[str]:
        """Register the model's own `LoRALinear` layers (e.g. the ones being trained) as adapter `name`:
        their current A and B, not copied, so switching back to `name` restores the very parameters
        an optimiser holds. Adapters loaded afterwards share these layers."""
        if name in self.adapters:
            raise UsageError(f"an adapter named {name!r} is already loaded (from {self.adapters[name].path})")
        layers = {fqn: m for fqn, m in self.model.named_modules() if type(m) is LoRALinear and fqn not in self._layers}
        for fqn, layer in layers.items():
            self._layers[fqn], self._slots[fqn] = layer, _slots(layer)
        self.adapters[name] = LoadedAdapter(spec, Path("<model>"), {
            fqn: (layer.lora_A.weight, layer.lora_B.weight) for fqn, layer in layers.items()})
        self.active = name
        return list(layers)

    def unload(self, name: str) -> None:
        """Forget adapter `name` (deactivating it first) and unwrap modules no adapter needs."""
        self._check_name(name)
        if self.active == name:
            self.set_adapter(None)
        del self.adapters[name]
        needed = {fqn for adapter in self.adapters.values() for fqn in adapter.pairs}
        unused = set(self._layers) - needed
        swap_modules(self.model, lambda m, fqn: fqn in unused, lambda m: m.base)
        self._layers = {fqn: layer for fqn, layer in self._layers.items() if fqn in needed}
        self._slots = {fqn: _slots(layer) for fqn, layer in self._layers.items()}
        for fqn, layer in self._layers.items():  # drop pointers into the forgotten tensors
            if layer.disabled:
                _point(self._slots[fqn], _placeholder(layer), {"disabled": True})

    def _wrap_experts(self, spec: LoraSpec, source: Path) -> None:
        """Wrap the experts modules an adapter's `target_parameters` name in disabled `ExpertLoRA`
        chains (qlora.adapters.experts), once; every adapter must name the same parameters, as in PEFT."""
        if not spec.target_parameters:
            return
        for fqn, names in expert_targets(self.model, spec.target_parameters).items():
            chain = [fqn + ".base_layer" * depth for depth in range(len(names))]  # outermost first
            if chain[0] in self._layers:
                wrapped = [self._layers[f].parameter_name for f in reversed(chain) if f in self._layers]
                if wrapped != names:
                    raise UsageError(f"{source}: adapts {names} of {fqn!r}, but the loaded adapters adapt "
                                     f"{wrapped}; expert adapters on one model must target the same parameters")
                continue
            module = self.model.get_submodule(fqn)
            for name in names:
                module = ExpertLoRA(module, name, r=1, alpha=1.0, dtype=self.dtype)
            parent, _, leaf = fqn.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, module)
            for level in chain:
                self._register(level, self.model.get_submodule(level))
        use_qlora_experts(self.model)

    def _register(self, fqn: str, layer: nn.Module) -> None:
        layer.disabled = True
        layer.requires_grad_(False)
        self._layers[fqn] = layer
        self._slots[fqn] = _slots(layer)

    def _wrap(self, fqns: list[str], source: Path) -> None:
        """Wrap the named linear modules not yet wrapped in a disabled `LoRALinear`."""
        modules = dict(self.model.named_modules())
        todo = {fqn for fqn in fqns if fqn not in self._layers}
        wrong = sorted(fqn for fqn in todo if not isinstance(modules.get(fqn), LINEAR_LIKE))
        if wrong:
            raise UsageError(f"{source}: adapted modules {wrong[:3]} are not linear layers of this model")
        swap_modules(self.model, lambda m, fqn: fqn in todo, partial(LoRALinear, r=1, alpha=1.0, dtype=self.dtype))
        for fqn, module in self.model.named_modules():
            if fqn in todo:
                self._register(fqn, module)

    def _parameters(self, fqn: str, lora_A: torch.Tensor, lora_B: torch.Tensor, source: Path) -> Pair:
        """The adapter's A and B for module `fqn` on the layer's device, in the set's dtype."""
        layer = self._layers[fqn]
        r = lora_A.shape[0]  # r * experts for an expert adapter
        if tuple(lora_A.shape) != (r, layer.in_features) or tuple(lora_B.shape) != (layer.out_features, r):
            raise UsageError(f"{source}: module {fqn!r} has A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)}; "
                             f"the model's layer is {layer.in_features} -> {layer.out_features}")
        device = layer.lora_A.weight.device
        # copy=True: own memory, not pages of the (memory-mapped) safetensors file
        return tuple(nn.Parameter(t.to(device, self.dtype, copy=True), requires_grad=False) for t in (lora_A, lora_B))

    # ---------------------------------------------------------------------------------- switch
    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter (None: the base only), by swapping parameter pointers."""
        if name is not None:
            self._check_name(name)
        adapter = self.adapters[name] if name is not None else None
        pairs, attributes = (adapter.pairs, adapter.attributes) if adapter else ({}, None)
        for fqn, slots in self._slots.items():
            _point(slots, pairs.get(fqn), attributes)
        self.active = name

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block; the active adapter comes back afterwards."""
        active = self.active
        self.set_adapter(None)
        try:
            yield
        finally:
            self.set_adapter(active)

    def _check_name(self, name: str) -> None:
        if name not in self.adapters:
            raise UsageError(f"no adapter named {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")

    # ------------------------------------------------------------------------- mixed batches
    @contextlib.contextmanager
    def mixed(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Inside the block, a forward over a batch of len(rows) uses adapter rows[i] for row i."""
        for name in rows:
            if name is not None:
                self._check_name(name)
        used = list(dict.fromkeys(name for name in rows if name is not None))
        experts = [name for name in used if self.adapters[name].spec.target_parameters]
        if experts:
            raise UsageError(f"mixed-adapter batches add linear LoRA updates only; {experts} adapt fused experts "
                             "(use set_adapter and one adapter per batch)")
        active = self.active
        self.set_adapter(None)
        hooks = []
        for fqn, layer in self._layers.items():
            groups = [(torch.tensor([i for i, row in enumerate(rows) if row == name], device=pair[0].device),
                       *pair, self.adapters[name].spec.scaling)
                      for name in used if (pair := self.adapters[name].pairs.get(fqn)) is not None]
            if groups:
                hooks.append(layer.register_forward_hook(partial(_add_rows, groups=groups, batch=len(rows))))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self.set_adapter(active)


def _slots(layer: LoRALinear) -> tuple[dict, dict, dict]:
    """The dicts a switch writes: the layer's attributes, lora_A's and lora_B's parameters."""
    return vars(layer), layer.lora_A._parameters, layer.lora_B._parameters


def _point(slots: tuple[dict, dict, dict], pair: Pair | None, attributes: dict | None) -> None:
    """Point a layer at an adapter's A and B (no copy) and take its rank and scaling; `pair` None
    disables the layer (keeping its pointers).

    Note: the attributes go straight into the module's `__dict__` and the parameters into
    `_parameters`, where `nn.Module.__setattr__` would put them, without its type checks and
    attribute look-ups: those cost ~2 us an attribute, milliseconds a switch of the 210 modules
    of SmolLM2-135M (measured), against tens of microseconds this way.
    """
    attrs, params_A, params_B = slots
    if pair is None:
        attrs["disabled"] = True
        return
    params_A["weight"], params_B["weight"] = pair
    attrs.update(attributes)


def _placeholder(layer: LoRALinear) -> Pair:
    """A rank-1 zero A and B for a disabled layer, so it holds no unloaded adapter's tensors."""
    like = layer.lora_A.weight
    return (nn.Parameter(like.new_zeros(1, layer.in_features), requires_grad=False),
            nn.Parameter(like.new_zeros(layer.out_features, 1), requires_grad=False))


def _add_rows(layer: LoRALinear, args: tuple, out: torch.Tensor, *, groups: list, batch: int) -> torch.Tensor:
    """Forward hook: `out` (the base's output) + each row's own adapter update.

    `groups`: (row indices, A, B, scaling) per adapter the batch uses on this layer.
    """
    x = args[0]
    if x.dim() != 3 or x.shape[0] != batch:
        raise UsageError(f"a mixed-adapter forward needs inputs (batch={batch}, tokens, features); "
                         f"got {tuple(x.shape)}")
    y = out.clone()
    for rows, lora_A, lora_B, scaling in groups:
        y[rows] = plus_update(out[rows], F.linear(x[rows].to(lora_A.dtype), lora_A), lora_B, scaling)
    return y
