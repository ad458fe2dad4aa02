"""LoRA adapters on disk, in PEFT's format, so that ``peft.PeftModel.from_pretrained`` reads ours.

A folder holds two files:
- ``adapter_config.json``: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora``, ``target_modules``, ``base_model_name_or_path`` and PEFT's
  defaults for what we do not use (no bias, no DoRA, no rank/alpha patterns).
- ``adapter_model.safetensors``: ``base_model.model.<fqn>.lora_A.weight`` (r, in) and
  ``base_model.model.<fqn>.lora_B.weight`` (out, r) for each adapted module ``<fqn>``.

``target_modules`` is written as the list of leaf names (``["q_proj", "v_proj"]``) when those names
select exactly the adapted modules, else as a regex over the full names, which PEFT matches with
``re.fullmatch``, so PEFT adapts the same modules we did. Folders are written atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.export import atomic_folder
from qlora.surgery import LINEAR_LIKE, apply_lora
from qlora.nn import LoRALinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by full name."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LoRALinear)}


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


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    r: int,
    alpha: float,
    dropout: float,
    targets: str | Sequence[str],
    use_rslora: bool,
) -> Path:
    """Write the model's LoRA weights and config as a PEFT adapter folder (replaced atomically).

    ``target_modules`` is derived from the modules actually adapted; ``targets`` (the value given to
    ``apply_lora``) is kept for provenance in the safetensors metadata (``qlora_targets``), where
    PEFT does not look.
    """
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise UsageError("save_adapter: the model has no LoRALinear modules (call apply_lora first)")
    wrong = [fqn for fqn, m in modules.items() if m.r != r]
    if wrong:
        raise UsageError(f"save_adapter: r={r}, but modules {wrong[:3]} have r={modules[wrong[0]].r}")
    tensors = {}
    for fqn, m in modules.items():
        tensors[f"{PEFT_PREFIX}{fqn}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{fqn}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": _target_modules(model, list(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
        raise UsageError(f"save_adapter: {out_dir} exists and is not an adapter folder; refusing to replace it")
    with atomic_folder(out_dir, replace=True) as tmp:
        metadata = {"format": "pt", "qlora_targets": json.dumps(targets if isinstance(targets, str) else list(targets))}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's config, checked for what qlora supports (plain LoRA on linear layers)."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{adapter_dir}: no {CONFIG_FILE}; expected a PEFT LoRA adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    checks = {
        "peft_type": (config.get("peft_type"), "LORA"),
        "use_dora": (bool(config.get("use_dora")), False),
        "rank_pattern": (bool(config.get("rank_pattern")), False),
        "alpha_pattern": (bool(config.get("alpha_pattern")), False),
        "modules_to_save": (bool(config.get("modules_to_save")), False),
        "bias": (config.get("bias", "none"), "none"),
    }
    for field, (value, allowed) in checks.items():
        if value != allowed:
            raise UsageError(f"{path}: {field}={config.get(field)!r} is not supported; qlora needs {allowed!r}")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise UsageError(f"{path}: missing field {field!r}")
    return config


def load_adapter(model: nn.Module, adapter_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Wrap ``model`` per the adapter's config and load its weights; returns the adapted modules."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UsageError(f"{adapter_dir}: no {WEIGHTS_FILE} (qlora reads safetensors adapters only)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:
        raise UsageError(f"{weights_path}: not a readable safetensors file ({err})") from err
    targets = config["target_modules"]
    targets = f"re:{targets}" if isinstance(targets, str) and targets != "all-linear" else targets
    adapted = apply_lora(
        model,
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets=targets,
        use_rslora=config.get("use_rslora", False),
        dtype=dtype,
    )
    load_lora_weights(model, tensors, weights_path)
    return adapted


def load_lora_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = {}
    for fqn, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            expected[f"{PEFT_PREFIX}{fqn}.{part}.weight"] = getattr(m, part).weight
    # PEFT may keep the adapter name in keys written by old versions: "...lora_A.default.weight".
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
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
