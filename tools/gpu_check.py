"""One prepared device check: our 4-bit paths on a GPU against the CPU reference, plus timings.

Run it once on a machine with CUDA (`python tools/gpu_check.py`); without CUDA it runs the same
checks on the CPU (a smoke test of the script). Prints one table: every check's result, and the
timings of dequantise (vs a bf16 `copy_` of the same output and vs bitsandbytes when installed)
and of a Linear4bit forward+backward, as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qlora.nn import Linear4bit
from qlora.quant import api, dequantize_4bit, quantize_4bit


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Median milliseconds of fn()."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _cpu_reference(fn):
    saved = os.environ.get("QLORA_BACKEND")
    os.environ["QLORA_BACKEND"] = "reference"
    try:
        return fn()
    finally:
        os.environ.pop("QLORA_BACKEND")
        if saved is not None:
            os.environ["QLORA_BACKEND"] = saved


def checks(device: torch.device) -> list[tuple[str, bool, str]]:
    rows = []
    x = torch.randn(512, 1000, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    for quant_type in ("nf4", "fp4", "int4"):
        packed, state = quantize_4bit(x.to(device), quant_type, 64, True)
        ref_packed, ref_state = _cpu_reference(lambda: quantize_4bit(x, quant_type, 64, True))
        same = torch.equal(packed.cpu(), ref_packed) and torch.equal(state.absmax.cpu(), ref_state.absmax)
        values = torch.equal(dequantize_4bit(packed, state).cpu(),
                             _cpu_reference(lambda: dequantize_4bit(ref_packed, ref_state)))
        rows.append((f"{quant_type} quantise+dequantise == CPU reference", same and values, ""))
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512)
    layer_cpu = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(linear.to(device), compute_dtype=torch.float32)
    inp = torch.randn(8, 1024)
    a, b = inp.clone().requires_grad_(), inp.clone().to(device).requires_grad_()
    ya, yb = layer_cpu(a), layer(b)
    ya.sum().backward()
    yb.sum().backward()
    err = max((ya - yb.cpu()).abs().max().item(), (a.grad - b.grad.cpu()).abs().max().item())
    rows.append(("Linear4bit fwd/bwd fp32 vs CPU", err < 1e-3, f"max diff {err:.2e}"))
    return rows


def timings(device: torch.device, repeat: int) -> list[tuple[str, float, float, str]]:
    rows = []
    for shape in ((4096, 4096), (11008, 4096)):
        w = torch.randn(*shape, dtype=torch.bfloat16, device=device)
        packed, state = quantize_4bit(w)
        out = torch.empty_like(w)
        ours = _timed(lambda: dequantize_4bit(packed, state, out=out), device, repeat)
        copy = _timed(lambda: out.copy_(w), device, repeat)
        rows.append((f"dequantise {shape[0]}x{shape[1]} vs bf16 copy_", ours, copy, "copy_"))
        try:
            import bitsandbytes.functional as bnbf

            bp, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            peer = _timed(lambda: bnbf.dequantize_4bit(bp, bs), device, repeat)
            rows.append((f"dequantise {shape[0]}x{shape[1]} vs bitsandbytes", ours, peer, "bnb"))
        except ImportError:
            pass
    layer = Linear4bit.from_linear(torch.nn.Linear(4096, 4096, device=device), compute_dtype=torch.bfloat16)
    dense = torch.nn.Linear(4096, 4096, device=device, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(2048, 4096, dtype=torch.bfloat16, device=device, requires_grad=True)
    ours = _timed(lambda: layer(x).sum().backward(), device, repeat)
    peer = _timed(lambda: dense(x).sum().backward(), device, repeat)
    rows.append(("Linear4bit fwd+bwd 2048x4096 vs bf16 nn.Linear", ours, peer, "nn.Linear"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'check':<48} {'result':>8}  detail")
    for label, ok, detail in checks(device):
        print(f"{label:<48} {'ok' if ok else 'FAIL':>8}  {detail}")
    print(f"\n{'timing':<48} {'ours ms':>9} {'peer ms':>9} {'peer/ours':>10}")
    for label, ours, peer, _ in timings(device, args.repeat):
        print(f"{label:<48} {ours:>9.3f} {peer:>9.3f} {peer / ours:>10.2f}")


if __name__ == "__main__":
    main()
