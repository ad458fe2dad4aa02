"""Merging adapters into base weights: pure functions over state dicts, and the model-level merge.

For a LoRA adapter on module m with A (r, in), B (out, r) and scaling s:

    W'_m = round_dtype(W_m + s * B_m @ A_m)       the sum in fp32, one rounding (`add_delta`)
    W'_m = round_dtype(m_m / ||W_m + s B_m A_m||_row * (W_m + s B_m A_m))   DoRA (`dora_weight`)

where W_m is the 16-bit base weight, or the exactly dequantised 4-bit one (never re-quantised).
`merge_state_dict` does this over plain dicts (a base state dict, 16-bit or bitsandbytes 4-bit,
and a PEFT-keyed adapter state dict) with no model built: the form that adapter composition and
hot swap need. Its per-weight step, `AdapterUpdates.apply`, is also what `qlora export --gguf`
streams through, one tensor at a time. `merge_lora` does the same to a loaded model in place, through the same two
functions (`lora_delta`, `add_delta`), so both agree bit for bit (tested). `merge_adapter` is the
`qlora merge` command: load the base, merge, write a Hugging Face folder with the recipe beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from qlora.adapters.peft_format import PEFT_PREFIX, lora_pairs
from qlora.adapters.spec import CONFIG_FILE, LoraSpec
from qlora.errors import UsageError
from qlora.nn.dora import dora_weight
from qlora.nn.lora import add_delta, lora_delta
from qlora.quant import QuantState, dequantize_4bit

QUANT_STATE_INFIX = ".quant_state.bitsandbytes__"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # PEFT's DoRA key


def quantised_parts(keys: Iterable[str]) -> dict[str, list[str]]:
    """`<fqn>.weight` -> the keys of its bitsandbytes quantisation entries, for every 4-bit weight
    among checkpoint `keys` (``weight.absmax``, ``weight.quant_map``, ... ``weight.quant_state.*``)."""
    keys = list(keys)
    parts: dict[str, list[str]] = {k.split(QUANT_STATE_INFIX)[0]: [] for k in keys if QUANT_STATE_INFIX in k}
    for key in keys:
        owner = key.rpartition(".")[0]
        while owner and owner not in parts:
            owner = owner.rpartition(".")[0]
        if owner:
            parts[owner].append(key)
    return parts


def dequantized_state_dict(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` with every bitsandbytes 4-bit weight replaced by its exact dequantisation."""
    quantised = quantised_parts(base)
    inner = {k for parts in quantised.values() for k in parts}
    out = {}
    for key, value in base.items():
        if key in inner:
            continue
        if key in quantised:
            state = QuantState.from_dict({k: base[k] for k in quantised[key]}, prefix=key + ".")
            value = dequantize_4bit(value, state)
        out[key] = value
    return out


class AdapterUpdates:
    """What an adapter changes, weight by weight: `apply(key, W)` is W's merged value, computed
    when asked (one fp32 delta alive at a time), so a merge can stream one tensor at a time.

    Built from a PEFT-keyed adapter state dict and its spec; `check(shapes)` refuses an adapter
    that does not fit a base (a missing weight or another shape) before anything is merged.
    """

    def __init__(self, adapter: dict[str, torch.Tensor], spec: LoraSpec) -> None:
        self.scaling = spec.scaling
        self.pairs = {f"{fqn}.weight": pair for fqn, pair in lora_pairs(adapter).items()}
        self.magnitudes = {f"{k.removeprefix(PEFT_PREFIX).removesuffix(MAGNITUDE_SUFFIX)}.weight": v
                           for k, v in adapter.items() if k.endswith(MAGNITUDE_SUFFIX)}
        if self.magnitudes.keys() - self.pairs.keys():
            extra = sorted(self.magnitudes.keys() - self.pairs.keys())[:3]
            raise UsageError(f"adapter magnitudes without a lora_A / lora_B pair: {extra}")

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every adapted weight must be in `shapes` (key -> base shape) with the update's shape."""
        for key, (lora_A, lora_B) in self.pairs.items():
            want = (lora_B.shape[0], lora_A.shape[1])
            if tuple(shapes.get(key, ())) != want:
                got = tuple(shapes[key]) if key in shapes else "no such tensor"
                raise UsageError(f"adapter update for {key!r} has shape {want}; the base has {got}")

    def apply(self, key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`value` (the base tensor `key`) merged and cast to `dtype`; non-float tensors unchanged."""
        if key not in self.pairs:
            return value.to(dtype) if value.is_floating_point() else value
        delta = lora_delta(*self.pairs[key], self.scaling)
        if key in self.magnitudes:
            return dora_weight(value, delta, self.magnitudes[key]).to(dtype)
        return add_delta(value, delta, dtype)


def merge_state_dict(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], spec: LoraSpec,
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A plain `dtype` state dict: 4-bit weights dequantised, adapted weights W + s * B @ A
    (DoRA: m / ||W + s B A||_row * (W + s B A) where the adapter has a magnitude m).

    Non-float tensors keep their dtype. Every adapted weight must exist in `base` with the
    adapter's shape, otherwise a UsageError names it.
    """
    weights = dequantized_state_dict(base)
    updates = AdapterUpdates(adapter, spec)
    updates.check({key: tuple(value.shape) for key, value in weights.items()})
    return {key: updates.apply(key, value, dtype) for key, value in weights.items()}


def merge_lora(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold every adapter into its base and dequantise every 4-bit layer, in place: a plain model."""
    from qlora.nn import Linear4bit, LoRALinear
    from qlora.nn.swap import swap_modules
    from qlora.progress import byte_bar

    def weight_bytes(m: nn.Module) -> int:  # of the plain weight a merged / dequantised layer gets
        return m.out_features * m.in_features * dtype.itemsize

    _merge_experts(model, dtype)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    inner = {id(m.base) for m in lora}
    quantised = [m for m in model.modules() if isinstance(m, Linear4bit) and id(m) not in inner]
    with byte_bar(sum(map(weight_bytes, lora + quantised)), "merge") as bar:
        def fold(m: LoRALinear) -> nn.Module:
            bar.update(weight_bytes(m))
            return m.merged_linear(dtype)

        def dequantise(m: Linear4bit) -> nn.Module:
            bar.update(weight_bytes(m))
            return m.to_linear(dtype)

        swap_modules(model, lambda m, _: isinstance(m, LoRALinear), fold)
        swap_modules(model, lambda m, _: isinstance(m, Linear4bit), dequantise)
    return model


def _merge_experts(model: nn.Module, dtype: torch.dtype) -> None:
    """Fold expert adapters into (and dequantise 4-bit experts to) 16-bit fused parameters."""
    from qlora.nn.experts4bit import Experts4bit
    from qlora.nn.moe import ExpertLoRA, expert_parameter_names, is_experts, set_fused_weight
    from qlora.nn.swap import swap_modules

    swap_modules(model, lambda m, fqn: isinstance(m, ExpertLoRA) and not fqn.endswith(".base_layer"),
                 lambda m: m.merged_experts(dtype))
    for module in [m for m in model.modules() if is_experts(m)]:
        for name in expert_parameter_names(module):
            store = getattr(module, name)
            if isinstance(store, Experts4bit):
                set_fused_weight(module, name, store.dequantize().to(dtype))


def check_finite_model(model: nn.Module, what: str) -> None:
    """A UsageError naming the first floating tensor of `model` with a NaN or Inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UsageError(f"{what}: tensor {name!r} has {bad} non-finite value(s); nothing was written")


def adapter_base(adapter_dir: Path, base: str | None = None) -> str:
    """The base an adapter merges into: ``base`` when given, else the base saved in the adapter's
    run (`lora.init` changed it), else the adapter's ``base_model_name_or_path``."""
    from qlora.adapters.spec import read_peft_config
    from qlora.run_dir import saved_base

    found = base or saved_base(adapter_dir) or read_peft_config(adapter_dir).get("base_model_name_or_path")
    if not found:
        raise UsageError(f"{adapter_dir}: the adapter names no base_model_name_or_path; pass --base")
    return str(found)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Merge a PEFT LoRA adapter into its base and write a ``dtype`` HF folder (``qlora merge``).

    ``base`` defaults as `adapter_base` says. ``adapter_dir`` may be a run folder (its ``adapter/``
    is merged). An unquantised base is loaded in ``dtype`` (the original weights); a bitsandbytes
    4-bit base is dequantised. Tokenizer files saved with the adapter replace the base's; its
    prompt style and its run's recipe go with the merged folder, so ``qlora eval`` and ``generate``
    use the run's held-out rows and prompt format. ``inputs`` are more folders OUT must not be or
    hold (`qlora.outputs.check_destination`); a non-finite merged weight is refused, naming it,
    before anything is written.
    """
    from qlora.adapters.peft_format import load_adapter, read_adapter_weights
    from qlora.dtypes import hf_name, short_name
    from qlora.hf.export import write_model_folder
    from qlora.hf.files import copy_tokenizer_files
    from qlora.hf.folder import model_folder
    from qlora.hf.load import load_model
    from qlora.data.prompt_style import STYLE_FILE
    from qlora.io import atomic_folder
    from qlora.outputs import check_destination, provenance, write_provenance
    from qlora.run_dir import RECIPE, RunDir, find_recipe

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_FILE).is_file() and RunDir(adapter_dir).adapter.is_dir():
        adapter_dir = RunDir(adapter_dir).adapter  # a run folder: its final adapter
    base = adapter_base(adapter_dir, base)
    inputs = [adapter_dir, *inputs, *([base] if Path(base).is_dir() else [])]
    out_dir = check_destination(out_dir, overwrite, "merged", inputs)
    read_adapter_weights(adapter_dir)  # config and tensors checked before the base loads
    model = load_model(base, quant=None, dtype=dtype)
    load_adapter(model, adapter_dir, dtype=short_name(dtype))
    merge_lora(model, dtype)
    check_finite_model(model, f"the merge of {adapter_dir}")
    recipe = find_recipe(adapter_dir)
    with atomic_folder(out_dir, replace=overwrite) as tmp:
        write_model_folder(model, tmp, model_folder(base), {"dtype": hf_name(dtype)})
        write_provenance(tmp, provenance("merged", inputs))
        if (adapter_dir / "tokenizer_config.json").is_file():  # saved with a recipe's own chat template
            copy_tokenizer_files(adapter_dir, tmp)
        if recipe is not None:
            shutil.copy2(recipe, tmp / RECIPE)
        if (adapter_dir / STYLE_FILE).is_file():
            shutil.copy2(adapter_dir / STYLE_FILE, tmp / STYLE_FILE)
    return out_dir
