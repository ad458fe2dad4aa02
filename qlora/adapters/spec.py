"""`LoraSpec`: the one description of a LoRA adapter, shared by surgery, checkpoints and the PEFT
writer and reader.

The recipe's `lora` section builds it (`LoraConfig.spec()`), `apply_lora` attaches adapters by it,
`save_adapter` writes it as PEFT's `adapter_config.json` and `read_spec` reads one back, refusing
what qlora cannot run (other PEFT types, bias training, modules_to_save, rank/alpha patterns).
`use_dora` selects `DoRALinear` instead of `LoRALinear` (PEFT's field and meaning).

    scaling = alpha / r            (LoRA)
    scaling = alpha / sqrt(r)      (rsLoRA: keeps the update's scale stable as r grows)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import UsageError

CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scale, dropout, target modules and dtype of a LoRA adapter."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    """`all-linear`, `re:<regex>` over full module names, or module names (see qlora.nn.swap)."""
    use_rslora: bool = False
    dtype: str = "bf16"
    """dtype of the adapter matrices: bf16, fp16 or fp32."""
    use_dora: bool = False
    """DoRA (qlora.nn.dora): a trainable per-row magnitude on top of the low-rank update."""
    init: str = "default"
    """How training starts the adapter: default, loftq or pissa (qlora.adapters.init)."""
    loftq_iters: int = 1

    @property
    def changes_base(self) -> bool:
        """Whether the init replaces the 4-bit base (PiSSA, LoftQ with more than one iteration)."""
        return self.init == "pissa" or (self.init == "loftq" and self.loftq_iters > 1)

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def peft_config(self, target_modules: list[str] | str, base_model_name_or_path: str) -> dict:
        """PEFT's `adapter_config.json` for this spec; `target_modules` as the adapted modules show."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_model_name_or_path),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": target_modules,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_dora": self.use_dora,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_config(cls, config: dict, source: str = CONFIG_FILE, dtype: str = "bf16") -> "LoraSpec":
        """The spec of a PEFT LoRA config, or a UsageError naming the first unsupported field."""
        checks = {
            "peft_type": (config.get("peft_type"), "LORA"),
            "rank_pattern": (bool(config.get("rank_pattern")), False),
            "alpha_pattern": (bool(config.get("alpha_pattern")), False),
            "modules_to_save": (bool(config.get("modules_to_save")), False),
            "bias": (config.get("bias", "none"), "none"),
        }
        for field, (value, allowed) in checks.items():
            if value != allowed:
                raise UsageError(f"{source}: {field}={config.get(field)!r} is not supported; qlora needs {allowed!r}")
        for field in ("r", "lora_alpha", "target_modules"):
            if field not in config:
                raise UsageError(f"{source}: missing field {field!r}")
        targets = config["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            targets = f"re:{targets}"  # PEFT matches a string with re.fullmatch
        return cls(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   use_rslora=config.get("use_rslora", False), dtype=dtype,
                   use_dora=bool(config.get("use_dora", False)))


def read_peft_config(adapter_dir: str | Path) -> dict:
    """The adapter folder's `adapter_config.json` as a dict (a UsageError when missing or not JSON)."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{adapter_dir}: no {CONFIG_FILE}; expected a PEFT LoRA adapter folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err


def read_spec(adapter_dir: str | Path, dtype: str = "bf16") -> tuple[LoraSpec, dict]:
    """(spec, raw config) of an adapter folder, checked for what qlora supports."""
    config = read_peft_config(adapter_dir)
    return LoraSpec.from_peft_config(config, str(Path(adapter_dir) / CONFIG_FILE), dtype), config

