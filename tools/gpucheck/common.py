"""What every section shares: the run context, result rows, CUDA-event timing, memory counters.

Timing: CUDA executes asynchronously, so timing a call with the host clock between two
synchronisations measures the host too (~60-100 us of Python dispatch per `Linear4bit` call, with
the GPU idle). `timed` instead queues `repeat` calls back to back between two CUDA events and
divides: the GPU's time per call once the queue is full, which is what a training step sees. On
the CPU (smoke runs) the same loop is timed with the host clock.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

GIB = 1024**3
Row = dict  # {"section", "name", "ok" (True / False / None: a figure, or skipped), "value", "unit", "detail"}


@dataclass
class Context:
    """One run's settings and what the preflight found."""

    device: torch.device
    smoke: bool
    repeat: int
    tmp: str
    found: dict = field(default_factory=dict)  # preflight item -> Check

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def has(self, item: str) -> bool:
        return self.found[item].ok if item in self.found else False


def row(section: str, name: str, ok=None, value=None, unit: str = "", detail: str = "") -> Row:
    return {"section": section, "name": name, "ok": ok, "value": value, "unit": unit, "detail": detail}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Seconds per call of fn(), `repeat` calls back to back after one warm-up call (see module docstring)."""
    fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


@contextmanager
def backend(name: str):
    """QLORA_BACKEND=name inside the block."""
    saved = os.environ.get("QLORA_BACKEND")
    os.environ["QLORA_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("QLORA_BACKEND")
        if saved is not None:
            os.environ["QLORA_BACKEND"] = saved


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"
