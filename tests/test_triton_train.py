"""The CUDA code path of a training step, run on CPU: the real trainer with QLORA_BACKEND=triton
under Triton's interpreter (Linear4bit forward and backward through the Triton dequantise kernel,
the reused workspace, LoRA, gradient checkpointing, the chunked loss), against the native backend.

Kernel unit tests (tests/test_triton.py) check each kernel alone; this catches what they cannot:
the strides, shapes and workspace reuse of a real model's layers in a real step. Both runs use
torch's dropout (as CUDA does; the hashed mask is CPU-only) from the same seed, so their losses
must be equal: the Triton dequantise is bit-exact with the native one, and every matmul after it
is the same torch call. The interpreter executes each Triton program in numpy, so the run is kept
to three optimiser steps of one micro-batch.
"""

from __future__ import annotations

import os

import pytest

from qlora.recipe import load_recipe
from qlora.run_dir import read_metrics
from qlora.training import loop
from test_step import HostReads, cuda_code_path
from test_train import TINY

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)", allow_module_level=True)

OVERRIDES = ["optim.name=adamw", "train.max_steps=3", "train.grad_accum_steps=1", "train.log_every=1",
             "train.save_every=0", "train.eval_every=0", "data.eval_size=0"]


def losses(tmp_path, monkeypatch, backend: str, reads: HostReads | None = None) -> list[float]:
    cuda_code_path(monkeypatch, backend)
    cfg = load_recipe(TINY, [f"output.dir={tmp_path / backend}", *OVERRIDES])
    loop.train(cfg, **({"phase": reads.phase} if reads else {}))
    return [r["loss"] for r in read_metrics(tmp_path / backend) if "loss" in r]


@pytest.mark.slow
def test_triton_backend_trains_like_native(tmp_path, monkeypatch):
    native = losses(tmp_path, monkeypatch, "native")
    reads = HostReads(monkeypatch)
    triton = losses(tmp_path, monkeypatch, "triton", reads)
    assert len(native) == 3 and triton == native
    # Each step logs (log_every=1), so reads happen after the optimiser phase only, never inside
    # the forward, backward or optimiser step of the Triton path.
    inside = [e for i, e in enumerate(reads.events) if e[0] == "read" and _open_phase(reads.events[:i])]
    assert inside == [], inside


STEP_PHASES = ("forward", "backward", "optimizer")


def _open_phase(events: list[tuple[str, str]]) -> bool:
    """Whether a step phase (forward / backward / optimizer) is open at the end of `events`."""
    depth = 0
    for kind, name in events:
        if name in STEP_PHASES:
            depth += {"enter": 1, "exit": -1}.get(kind, 0)
    return depth > 0
