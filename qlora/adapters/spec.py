"""`LoraSpec`: the one description of a LoRA adapter, shared by surgery, checkpoints and the PEFT
writer and reader.

The recipe's `lora` section builds it (`LoraConfig.spec()`), `apply_lora` attaches adapters by it,
`save_adapter` writes it as PEFT's `adapter_config.json` and `read_spec` reads one back, refusing
what qlora cannot run (other PEFT types, bias training, modules_to_save, rank/alpha patterns).
`use_dora` selects `DoRALinear` instead of `LoRALinear` (PEFT's field and meaning); `adalora`
(an `AdaLoraSchedule`) selects `AdaLoRALinear` and is written as PEFT's ADALORA config.

    scaling = alpha / r            (LoRA)
    scaling = alpha / sqrt(r)      (rsLoRA: keeps the update's scale stable as r grows)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from qlora.adapters.validate import check_config
from qlora.errors import UsageError

CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of adapter tensors


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's rank budget (PEFT's AdaLoraConfig fields; `r` of the spec is the initial rank).

    The budget (total kept rank over all layers) stays at r * layers for `tinit` steps, falls with
    a cubic schedule to target_r * layers at step total_step - tfinal, masking every `delta_t`
    steps, then stays there (qlora.adapters.adalora.budget).
    """

    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    """EMA factor of the sensitivity |w * grad|."""
    beta2: float = 0.85
    """EMA factor of its uncertainty."""
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    """Optimiser steps of the run; known when training starts (`LoraSpec.scheduled`)."""

    def peft_fields(self) -> dict:
        return {"target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal,
                "deltaT": self.delta_t, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step}


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
    adalora: AdaLoraSchedule | None = None
    """AdaLoRA (qlora.nn.adalora): SVD-form adapters whose ranks the budget schedule reallocates."""
    target_parameters: str | tuple[str, ...] = ()
    """Fused expert parameters to adapt (PEFT's `target_parameters`): suffixes of parameter names
    (`mlp.experts.gate_up_proj`) or `all-experts` (qlora.adapters.experts)."""

    def scheduled(self, total_steps: int) -> "LoraSpec":
        """This spec with AdaLoRA's `total_step` set to the run's optimiser steps (else itself)."""
        if self.adalora is None:
            return self
        tinit, tfinal = self.adalora.tinit, self.adalora.tfinal
        if tinit + tfinal >= total_steps:
            raise UsageError(f"lora.tfinal: AdaLoRA's tinit + tfinal = {tinit + tfinal} leaves no budget phase in a "
                             f"run of {total_steps} optimiser steps; expected tinit + tfinal < {total_steps}")
        return replace(self, adalora=replace(self.adalora, total_step=total_steps))

    @property
    def changes_base(self) -> bool:
        """Whether the init replaces the 4-bit base (PiSSA, LoftQ with more than one iteration)."""
        return self.init == "pissa" or (self.init == "loftq" and self.loftq_iters > 1)

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.target_parameters, str):
            object.__setattr__(self, "target_parameters", tuple(self.target_parameters))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def peft_config(self, target_modules: list[str] | str, base_model_name_or_path: str) -> dict:
        """PEFT's `adapter_config.json` for this spec; `target_modules` as the adapted modules show.

        AdaLoRA: peft_type ADALORA with its schedule; PEFT reads the initial rank from `init_r`
        and ignores `r`, which keeps PEFT's default 8 (any other value makes PEFT warn).
        """
        config = self._lora_config(target_modules, base_model_name_or_path)
        if self.adalora is not None:
            config.update(self.adalora.peft_fields(), peft_type="ADALORA", r=8, init_r=self.r, rank_pattern=None)
        return config

    def _lora_config(self, target_modules: list[str] | str, base_model_name_or_path: str) -> dict:
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
            **({"target_parameters": list(self.target_parameters)}
               if self.target_parameters and not isinstance(self.target_parameters, str) else {}),
        }

    @classmethod
    def from_peft_config(cls, config: dict, source: str = CONFIG_FILE, dtype: str = "bf16") -> "LoraSpec":
        """The spec of a PEFT LoRA config, or a UsageError naming the first unsupported field.

        An AdaLoRA config reads as its LoRA equivalent (rank init_r, alpha so that alpha / r is
        AdaLoRA's scaling), the form `read_adapter_weights` gives its tensors in. Every field is
        checked first (`qlora.adapters.validate`).
        """
        check_config(config, source)
        if config.get("peft_type") == "ADALORA":
            from qlora.nn.adalora import PEFT_EPS

            if "init_r" not in config or "lora_alpha" not in config:
                raise UsageError(f"{source}: an ADALORA config needs init_r and lora_alpha")
            config = {**config, "peft_type": "LORA", "r": config["init_r"], "rank_pattern": None,
                      "lora_alpha": config["lora_alpha"] * config["init_r"] / (config["init_r"] + PEFT_EPS)}
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
                   use_dora=bool(config.get("use_dora", False)),
                   target_parameters=tuple(config.get("target_parameters") or ()))


def read_peft_config(adapter_dir: str | Path) -> dict:
    """The adapter folder's `adapter_config.json` as a dict (a UsageError when missing, not JSON, or
    a field qlora cannot use: `qlora.adapters.validate.check_config`)."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{adapter_dir}: no {CONFIG_FILE}; expected a PEFT LoRA adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    check_config(config, str(path))
    return config


def read_spec(adapter_dir: str | Path, dtype: str = "bf16") -> tuple[LoraSpec, dict]:
    """(spec, raw config) of an adapter folder, checked for what qlora supports."""
    config = read_peft_config(adapter_dir)
    return LoraSpec.from_peft_config(config, str(Path(adapter_dir) / CONFIG_FILE), dtype), config

