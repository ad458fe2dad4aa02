"""Where and how a run executes: device, dtype, threads, processes, seeds and RNG state.

Resolved once at the start of a run, so the rest of the code never asks again. Multi-process runs
are started by `torchrun` or `accelerate launch --multi_gpu` (both set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR); we join the process group with NCCL on CUDA and gloo on CPU.
Note: `accelerate launch --cpu --num_processes 2` starts ONE process; use `--multi_gpu` (it
works on CPU with gloo) or torchrun.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora.dtypes import torch_dtype
from qlora.errors import UsageError



@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def quiet_libraries() -> None:
    """bitsandbytes warns at import that an optional CPU GEMM plug-in is missing; we never use it."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def setup(device: str = "auto", dtype: str = "bf16", threads: int | None = None) -> Runtime:
    """Resolve device and dtype, set the thread count, and join the process group if launched so."""
    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("train.device is 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, torch_dtype(dtype), rank, world_size, local_rank)


def process_rank() -> int:
    """This process's rank as its launcher set it (0 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("RANK", "0"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few numbers over all processes (identity in a single process)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a device tensor over all processes in place, without a host read (identity in one process)."""
    if rt.distributed:
        dist.all_reduce(t)
    return t


def rng_state() -> dict:
    """Python and torch RNG states (for exact resume)."""
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
