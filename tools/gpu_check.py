#!/usr/bin/env python
"""One prepared device check: the GPU path against the CPU reference, its speed against its peers,
and the mission's headline (a LLaMA-65B QLoRA step under a 48 GB cap) as a measurement.

    python tools/gpu_check.py [--json PATH]        # on a CUDA machine: <= 8 minutes on one H200
    python tools/gpu_check.py --smoke              # the same code at toy sizes (CPU: a smoke test)

It runs from a plain checkout (it puts the repository on sys.path itself; no `pip install -e .`,
which needs the package index) on a bare GPU image. First a preflight names what is missing and
what to do about it; then every section that can run runs, and one that cannot gives a skipped row
with the reason. Fallbacks: no scipy -> the embedded NF4 table (tools/gpucheck/tables.py, equal to
scipy's build, tests/test_gpu_check.py); no accelerate -> models built under torch.device("meta");
no bitsandbytes (or one without its CUDA library) -> qlora's AdamW, named in the table; no C
compiler or Python.h for Triton's launcher -> the reference kernels, speed rows skipped.
`expandable_segments:True` is set in the allocator config before CUDA starts (the 65B build
interleaves small persistent and large temporary blocks under a cap on reserved memory).

Sections (tools/gpucheck/sections.py registers them; each is a block of rows in one table and one
JSON, `--json`, default gpu_check.json):
1. exact     quantise + dequantise on the device (Triton) == the CPU reference, bit for bit: every
             quant type, block sizes 64..4096, with and without double quantisation (the offset is
             a fixed-order mean: the same bits on every device), odd element counts, tensors that
             cross the kernels' tile and chunk seams, bf16 / fp16 / fp32 outputs.
2. bnb       against bitsandbytes' kernels: our 4-bit codes equal theirs, our dequantise of their
             bytes equals theirs; with double quantisation the offset's distance in ulps and, given
             their offset, the nested codes that differ (their CUDA quantiser searches exact
             midpoints, ours reproduces their CPU grid) are reported apart, not failed.
3. speed     dequantise GB/s against a `copy_` of the output and against bitsandbytes; 1-row matvec
             GB/s; Linear4bit forward+backward vs a bf16 nn.Linear at 4096 tokens. Timed with CUDA
             events over back-to-back calls (the GPU's time, not the host's dispatch).
4. step      a randomly initialised ~1.3B Llama (real shapes, built in-process): ours vs
             transformers + PEFT + bitsandbytes, tokens/s and max_memory_allocated, each row naming
             its optimiser; the plan's allocated part against the measured peak, the CUDA context
             apart (tools/gpucheck/train_sections.py).
5. 65b       a LLaMA-65B-shaped model with random weights, built and quantised on the GPU layer by
             layer, one QLoRA step (r=64 all-linear, seq 512, batch 1, checkpointing) under
             torch.cuda.set_per_process_memory_fraction capped at 48 GiB; its peak against the plan.

The GPU machine is offline and lacks bitsandbytes, peft, scipy and accelerate. On a machine with the
package index, `tools/gpu_bundle.sh [CUDA_VERSION] [OUT]` packs them into one folder (a trimmed
bitsandbytes with only the CUDA library for that version, peft, scipy, accelerate); carry the folder
and run `PYTHONPATH=OUT/site python tools/gpu_check.py` (or `pip install --no-index OUT/wheels/*`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _allocator_config() -> None:
    """expandable_segments:True in whichever allocator variable is in use, before torch starts CUDA."""
    name = "PYTORCH_ALLOC_CONF" if "PYTORCH_ALLOC_CONF" in os.environ else "PYTORCH_CUDA_ALLOC_CONF"
    conf = os.environ.get(name, "")
    if "expandable_segments" not in conf:
        os.environ[name] = ",".join(filter(None, [conf, "expandable_segments:True"]))


_allocator_config()
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):  # a plain checkout: no install needed
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpucheck.run import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
