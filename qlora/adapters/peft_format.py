"""LoRA adapters on disk, in PEFT's format, so that ``peft.PeftModel.from_pretrained`` reads ours.

A folder holds two files:
- ``adapter_config.json``: the `LoraSpec` as PEFT writes it (``peft_type`` LORA, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules``, ``base_model_name_or_path``
  and PEFT's defaults for what we do not use).
- ``adapter_model.safetensors``: ``base_model.model.<fqn>.lora_A.weight`` (r, in) and
  ``base_model.model.<fqn>.lora_B.weight`` (out, r) for each adapted module ``<fqn>``: the adapter
  as a plain state dict (`adapter_state_dict`), which is also what merging works on.

``target_modules`` is written as the list of leaf names (``["q_proj", "v_proj"]``) when those names
select exactly the adapted modules, else as a regex over the full names, which PEFT matches with
``re.fullmatch``, so PEFT adapts the same modules we did. Folders are written atomically, and the
safetensors bytes are deterministic: sorted keys and ONE metadata entry (``format: pt``), because
safetensors writes its metadata map in a per-process random order, so two entries made two
identical runs' files differ (the recipe.yaml beside a run's adapter keeps the recipe's targets).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qlora.adapters.adalora import lora_equivalent, prune, rank_pattern
from qlora.adapters.experts import parameter_suffixes
from qlora.adapters.fit import check_fits, check_tensors, shapes
from qlora.adapters.spec import CONFIG_FILE, PEFT_PREFIX, LoraSpec, read_peft_config, read_spec
from qlora.adapters.surgery import LINEAR_LIKE, apply_lora
from qlora.errors import UsageError
from qlora.hf.folder import shareable_name
from qlora.io import atomic_folder, write_bytes_atomic, write_json_atomic
from qlora.nn.adapter import adapter_layers
from qlora.nn.moe import ExpertLoRA
from qlora.outputs import write_provenance

WEIGHTS_FILE = "adapter_model.safetensors"


def _target_modules(model: nn.Module, adapted: Sequence[str]) -> list[str] | str:
    """Leaf names if they select exactly ``adapted`` among the linear-like modules, else a regex."""
    leaves = sorted({fqn.rpartition(".")[2] for fqn in adapted})
    wrapped = set(adapted)
    # The modules PEFT sees on the unwrapped base: the adapted ones and every other linear.
    linear = wrapped | {
        fqn
        for fqn, m in model.named_modules()
        if isinstance(m, LINEAR_LIKE) and fqn.rpartition(".")[0] not in wrapped
    }
    if {fqn for fqn in linear if fqn.rpartition(".")[2] in leaves} == wrapped:
        return leaves
    return "(" + "|".join(re.escape(fqn) for fqn in adapted) + ")"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` under its PEFT key, on the CPU, in model order."""
    tensors = {}
    for fqn, layer in adapter_layers(model).items():
        for name, (param, _) in layer.trainable_parameters().items():
            tensors[f"{PEFT_PREFIX}{fqn}.{name}"] = param.detach().cpu().contiguous()
    return tensors


def save_adapter(model: nn.Module, out_dir: str | Path, spec: LoraSpec, base_model_name_or_path: str,
                 prune_ranks: bool = True, tokenizer=None) -> Path:
    """Write the model's adapter weights and ``spec`` as a PEFT adapter folder (replaced atomically).

    ``target_modules`` is derived from the modules actually adapted; ``base_model_name_or_path``
    is written as `qlora.hf.folder.shareable_name` gives it (absolute folder, or the hub id).
    AdaLoRA: with ``prune_ranks`` only the kept triplets are written, named by ``rank_pattern``;
    without (checkpoints) the whole tensors, masked triplets zero in E. A ``tokenizer`` (given when
    the recipe set its own chat template) is saved beside them, ``chat_template.jinja`` included.
    """
    layers = adapter_layers(model)
    if not layers:
        raise UsageError("save_adapter: the model has no adapter layers (call apply_lora first)")
    wrong = [fqn for fqn, m in layers.items() if getattr(m, "r", spec.r) != spec.r]
    if wrong:
        raise UsageError(f"save_adapter: r={spec.r}, but modules {wrong[:3]} have r={layers[wrong[0]].r}")
    linears = [fqn for fqn, m in layers.items() if not isinstance(m, ExpertLoRA)]
    config = spec.peft_config(_target_modules(model, linears), shareable_name(base_model_name_or_path))
    if len(linears) < len(layers):
        config["target_parameters"] = parameter_suffixes(model)
    tensors = adapter_state_dict(model)
    if spec.adalora is not None and prune_ranks:
        config["rank_pattern"] = rank_pattern(model)
        tensors = prune(tensors, config["rank_pattern"])
    return write_adapter(out_dir, tensors, config, tokenizer)


def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer=None,
                  provenance: dict | None = None) -> Path:
    """Write PEFT-keyed ``tensors`` and a PEFT ``config`` as an adapter folder (replaced atomically),
    with a writer's ``provenance`` record (`qlora.outputs`) when given."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
        raise UsageError(f"save_adapter: {out_dir} exists and is not an adapter folder; refusing to replace it")
    with atomic_folder(out_dir, replace=True) as tmp:
        # Bytes first, then a Python write: a full disk raises OSError(ENOSPC), not a library error.
        write_bytes_atomic(tmp / WEIGHTS_FILE, save(dict(sorted(tensors.items())), metadata={"format": "pt"}))
        write_json_atomic(tmp / CONFIG_FILE, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_provenance(tmp, provenance)
    return out_dir


def read_adapter_weights(adapter_dir: str | Path, as_lora: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors (safetensors only), with PEFT's old ``.default`` key infix removed;
    an AdaLoRA adapter as its LoRA equivalent (qlora.adapters.adalora.lora_equivalent) unless
    ``as_lora`` is False (to load it back into AdaLoRA layers). Config and tensors are checked
    against each other first (`qlora.adapters.fit.check_tensors`)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise UsageError(f"{adapter_dir}: no {WEIGHTS_FILE} (qlora reads safetensors adapters only)")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise UsageError(f"{path}: not a readable safetensors file ({err})") from err
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    config = read_peft_config(adapter_dir)
    check_tensors(config, tensors, path)
    return lora_equivalent(tensors, config) if as_lora and config.get("peft_type") == "ADALORA" else tensors


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``<fqn>`` -> (A (r, in), B (out, r)) of a PEFT-keyed adapter state dict, in its key order."""
    pairs = {}
    for key, lora_A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        lora_B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if lora_B is None:
            raise UsageError(f"adapter tensor {key!r} has no matching lora_B")
        pairs[key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")] = (lora_A, lora_B)
    return pairs


def peft_key(fqn: str, factor: str) -> str:
    """PEFT's state-dict key of module ``fqn``'s ``factor`` (``lora_A`` or ``lora_B``)."""
    return f"{PEFT_PREFIX}{fqn}.{factor}.weight"


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: str = "bf16") -> list[str]:
    """Wrap ``model`` per the adapter's config and load its weights; returns the adapted modules.
    The adapter must fit the model (`qlora.adapters.fit.check_fits`)."""
    spec, _ = read_spec(adapter_dir, dtype)
    tensors = read_adapter_weights(adapter_dir)
    check_fits(model, shapes(lora_pairs(tensors)), spec.targets, adapter_dir, spec.target_parameters)
    adapted = apply_lora(model, spec)
    load_adapter_weights(model, tensors, Path(adapter_dir) / WEIGHTS_FILE)
    return adapted


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy PEFT-keyed ``tensors`` into the model's adapter layers (all must match, shapes too)."""
    expected = {}
    for fqn, layer in adapter_layers(model).items():
        for name, (param, _) in layer.trainable_parameters().items():
            expected[f"{PEFT_PREFIX}{fqn}.{name}"] = param
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"{source}: adapter weights do not fit the model: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise UsageError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}")
            param.copy_(tensors[key].to(param.device))
