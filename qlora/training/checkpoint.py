"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `checkpoints/step-000050/` in the run folder holding
- `adapter/`: the LoRA weights as a PEFT adapter (safetensors), written by rank 0,
- `trainer_state.rank<R>.pt`, one per process: optimiser (FSDP: this process's shards), scheduler,
  RNG and data-sampler states and counters. A run resumes with the number of processes it had.

The state files are written with `torch.save` and read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers (no arbitrary unpickling), so a tampered file
cannot run code. Each checkpoint is built in a temporary folder, fsynced and renamed into place,
so a run killed mid-save leaves the previous checkpoint intact and never a half-written one.

`manifest.json` records every file's size and SHA-256 at write time. Resume takes the newest
checkpoint that still verifies (a truncated or altered file fails) and names each one it skips, so
a damaged newest checkpoint costs `save_every` steps, not the run. Checkpoints written before
manifests existed are accepted as they are.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from qlora.adapters.peft_format import WEIGHTS_FILE, load_adapter_weights, save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.errors import UsageError
from qlora.checkpoint_files import (MANIFEST, STATE_FILE, checkpoint_dir, latest_checkpoint,  # noqa: F401 (re-exported)
                                    verify, write_manifest)
from qlora.io import atomic_folder, named_os_errors
from qlora.run_dir import ADAPTER, CHECKPOINTS

log = logging.getLogger("qlora")


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, spec: LoraSpec, base_model: str,
                    rank_state: dict, rt, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (every process calls this) and keep the newest `keep`.

    Rank 0 builds the folder under a temporary name and tells the others where it is; each process
    writes its own state file; rank 0 adds the adapter and renames the folder into place.
    """
    final = checkpoint_dir(run_dir, step)
    if not rt.is_main:
        tmp = Path(_exchange_path(None, rt))
        _save_state(rank_state, tmp / STATE_FILE.format(rank=rt.rank))
        _barrier(rt)  # states written
        _barrier(rt)  # folder renamed
        return final
    with atomic_folder(final, replace=True) as tmp:
        _exchange_path(str(tmp), rt)
        _save_state(rank_state, tmp / STATE_FILE.format(rank=0))
        _barrier(rt)
        save_adapter(model, tmp / ADAPTER, spec, base_model, prune_ranks=False)
        write_manifest(tmp)
    older = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p != final)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    _barrier(rt)
    return final


def _save_state(state: dict, path: Path) -> None:
    """torch.save through a Python file, so a full disk raises OSError(ENOSPC) with the path."""
    with named_os_errors(path), path.open("wb") as f:
        torch.save(state, f)


def _exchange_path(path: str | None, rt) -> str | None:
    if not rt.distributed:
        return path
    import torch.distributed as dist

    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(rt) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict`, keeping every state tensor's saved dtype.

    Both torch and bitsandbytes cast floating-point optimiser states to the parameter's dtype on
    load; bitsandbytes keeps fp32 states for small bf16 LoRA matrices, so that cast would round
    them to bf16 and a resumed run would drift from an uninterrupted one. A paged optimiser's
    large states go back into paged buffers (`get_state_buffer`, CUDA unified memory), so a
    resumed run keeps paging instead of pinning its optimiser state on the device.
    """
    optimizer.load_state_dict(saved)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        param = params[int(index)]
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and key != "step":
                value = _state_buffer(optimizer, param, key, value)
                if hasattr(param, "device_mesh"):  # FSDP: the file holds this process's shard
                    from torch.distributed.tensor import DTensor

                    value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False)
                optimizer.state[param][key] = value


def _state_buffer(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
    """`value` on the parameter's device, in a paged buffer when the optimiser pages that state."""
    paged = getattr(optimizer, "is_paged", False) and key in ("state1", "state2") and param.device.type == "cuda"
    if not paged or value.shape != param.shape:
        return value.to(param.device)
    buffer = optimizer.get_state_buffer(param, dtype=value.dtype)  # paged when large enough
    return buffer.copy_(value)


def load_checkpoint(path: Path, model: nn.Module, rank: int = 0, world_size: int = 1) -> dict:
    """Load checkpoint `path`'s adapter weights into `model` (LoRA-wrapped, not yet sharded); return this rank's state."""
    from safetensors.torch import load_file

    written = len(list(path.glob(STATE_FILE.format(rank="*"))))
    if written != world_size:
        raise UsageError(f"checkpoint {path} was written by {written} process(es); resume it with "
                         f"{written}, not {world_size}")
    weights = path / ADAPTER / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise UsageError(f"checkpoint adapter {weights} is not a readable safetensors file ({err})") from None
    load_adapter_weights(model, tensors, weights)
    state_file = path / STATE_FILE.format(rank=rank)
    try:
        return torch.load(state_file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise UsageError(f"checkpoint state {state_file} is damaged or was altered, refused: "
                         f"{str(err).splitlines()[0]}; delete {path} to resume from an older checkpoint") from None
