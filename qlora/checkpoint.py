"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step-000050/` in the run folder holding
- `adapter/`: the LoRA weights as a PEFT adapter (safetensors),
- `trainer_state.pt`: optimiser, scheduler, RNG and data-sampler states and counters.

`trainer_state.pt` is written with `torch.save` and read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers (no arbitrary unpickling), so a tampered file
cannot run code. Each checkpoint is built in a temporary folder and renamed into place, so a run
killed mid-save leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from qlora.adapter import WEIGHTS_FILE, load_lora_weights, save_adapter
from qlora.errors import UsageError
from qlora.export import atomic_folder

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = run_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*")
             if (m := _STEP_DIR.search(p.name)) and (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return max(found)[1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, adapter_kwargs: dict, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    with atomic_folder(final, replace=True) as tmp:
        save_adapter(model, tmp / "adapter", **adapter_kwargs)
        torch.save(trainer_state, tmp / STATE_FILE)
    older = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p != final)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict`, keeping every state tensor's saved dtype.

    Both torch and bitsandbytes cast floating-point optimiser states to the parameter's dtype on
    load; bitsandbytes keeps fp32 states for small bf16 LoRA matrices, so that cast would round
    them to bf16 and a resumed run would drift from an uninterrupted one.
    """
    optimizer.load_state_dict(saved)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        param = params[int(index)]
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and key != "step":
                optimizer.state[param][key] = value.to(param.device)


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Load the adapter weights of checkpoint `path` into `model` (already LoRA-wrapped); return its state."""
    from safetensors.torch import load_file

    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UsageError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    weights = path / "adapter" / WEIGHTS_FILE
    load_lora_weights(model, load_file(weights), weights)
    return torch.load(state_file, weights_only=True)
