"""What the machine has, what is missing, what to do about it, and the fallbacks put in place.

A bare GPU image (the lent machine's: torch, transformers, triton, no scipy, accelerate,
bitsandbytes or peft, maybe no C compiler) must still run every section that can run. Each item
is a `Check`: ok True (present), False (missing: `fix` says what to do) or None (not needed here),
and `note` says which fallback the run uses instead.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from gpucheck import tables


@dataclass
class Check:
    ok: bool | None
    detail: str
    fix: str = ""


def _imports(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as err:  # ImportError, or a broken install failing at import time
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:160]


def scipy_check() -> Check:
    module, why = _imports("scipy.stats")
    if module is not None:
        return Check(True, "present: the NF4 table is built from normal quantiles")
    tables.use_embedded_nf4()
    return Check(False, f"missing ({why}); NF4 uses the embedded table (tools/gpucheck/tables.py)",
                 "pip install scipy (its wheel is in the bundle: tools/gpu_bundle.sh)")


def tables_check() -> Check:
    bad = tables.differing_tables()
    return Check(not bad, "the 4-bit tables equal bitsandbytes' published values" if not bad else
                 f"tables differ from the published values: {bad}", "" if not bad else "report this: a build bug")


def accelerate_check() -> Check:
    module, why = _imports("accelerate")
    if module is not None:
        return Check(True, "present: models are built with init_empty_weights")
    return Check(False, f"missing ({why}); models are built under torch.device('meta')",
                 "optional: pip install accelerate (in the bundle)")


def transformers_check() -> Check:
    module, why = _imports("transformers")
    return (Check(True, f"transformers {module.__version__}") if module is not None else
            Check(False, f"missing ({why}); the step and 65b sections need it", "pip install transformers"))


def triton_check(device: torch.device) -> Check:
    """Triton JIT-compiles a small C launcher per kernel: it needs a C compiler and Python.h."""
    if device.type != "cuda":
        return Check(None, "not used: CPU tensors take the native kernels")
    module, why = _imports("triton")
    if module is None:
        return Check(False, f"missing ({why}); the reference backend runs instead", "pip install triton")
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = ([] if cc and shutil.which(cc) else ["a C compiler (cc/gcc/clang or $CC)"]) + \
              ([] if header.exists() else [f"Python.h ({header})"])
    if missing:
        os.environ["QLORA_BACKEND"] = "reference"
        return Check(False, f"triton {module.__version__} cannot build its launcher: no {' and no '.join(missing)}; "
                     "QLORA_BACKEND=reference for this run (speed rows skipped)",
                     "apt-get install gcc python3-dev (or set CC to a compiler)")
    return Check(True, f"triton {module.__version__}, compiler {cc}")


def bitsandbytes_check(device: torch.device) -> Check:
    """Importing is not enough: without its native library for this device bitsandbytes imports
    and then fails at the first kernel call."""
    module, why = _imports("bitsandbytes")
    fix = "carry the trimmed bitsandbytes from tools/gpu_bundle.sh (PYTHONPATH=bundle/site)"
    if module is None:
        return Check(False, f"missing ({why}); its rows are skipped, the steps use qlora's AdamW", fix)
    lib = getattr(importlib.import_module("bitsandbytes.cextension"), "lib", None)
    if device.type == "cuda" and not getattr(lib, "compiled_with_cuda", False):
        return Check(False, f"bitsandbytes {module.__version__} imports but its CUDA library did not load "
                     f"({type(lib).__name__}); its rows are skipped, the steps use qlora's AdamW",
                     fix + "; its libbitsandbytes_cuda<ver>.so must match torch.version.cuda")
    return Check(True, f"bitsandbytes {module.__version__}")


def peft_check() -> Check:
    module, why = _imports("peft")
    return (Check(True, f"peft {module.__version__}") if module is not None else
            Check(False, f"missing ({why}); the transformers + PEFT peer is skipped", "pip install peft (in the bundle)"))


def allocator_check(device: torch.device) -> Check:
    conf = os.environ.get("PYTORCH_ALLOC_CONF", "") + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if device.type != "cuda":
        return Check(None, "not used on CPU")
    ok = "expandable_segments:True" in conf
    return Check(ok, f"allocator config {conf!r}" + ("" if ok else ": the 48 GiB cap sees fragmented blocks"),
                 "" if ok else "run tools/gpu_check.py itself: it sets expandable_segments before CUDA starts")


def preflight(device: torch.device) -> dict[str, Check]:
    """Every item, in the order printed; fallbacks are installed as a side effect."""
    return {"scipy": scipy_check(), "tables": tables_check(), "accelerate": accelerate_check(),
            "transformers": transformers_check(), "triton": triton_check(device),
            "bitsandbytes": bitsandbytes_check(device), "peft": peft_check(), "allocator": allocator_check(device)}
