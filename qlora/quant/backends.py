"""Kernel backends for the 4-bit operations, and the ONE place that picks one for a device.

A backend does three things over flat tensors and a `QuantState`, all bit-identical to the
pure-PyTorch reference (and so to bitsandbytes' format):

    quantize(x, blocksize, quant_type)  -> (packed uint8 ((n+1)//2,), fp32 absmax (n_blocks,))
    dequantize(data, state, out)        writes the n values into the flat tensor `out`
    gemv(x, data, state, out)           out (rows, n_out) = x (rows, n_in) @ W.T for rows <= 8,
                                        reading the packed weight directly; None: not offered

    reference  pure PyTorch on any device (`qlora.quant.reference`): the oracle
    native     C + OpenMP + AVX-512 on CPU tensors (`qlora.quant.native`, built at first use)
    triton     Triton kernels on CUDA tensors (`qlora.quant.triton`); with TRITON_INTERPRET=1 they
               run on CPU tensors in Triton's interpreter, which is how the CPU tests prove them

`select(device)` picks: `QLORA_BACKEND=native|triton|reference` when set, else native on CPU (when
it built), triton on CUDA (when importable), the reference otherwise. Double quantisation of the
absmax vector (64x smaller than the weight) is always done by the reference; decoding it is part of
each backend's dequantise, since that runs on every forward and backward.

Note: what "bit-exact with bitsandbytes" means. Precisely:
- the packed 4-bit codes and the fp32 absmax per block equal bitsandbytes' on any device, and so
  does every dequantised value of the same bytes (our dequantise of their tensors equals theirs);
- with double quantisation, the offset (the mean of the block scales) is stored and the nested
  codes quantise `absmax - offset`. bitsandbytes takes torch's fp32 `absmax.mean()`, whose bits
  depend on the device and the thread count; ours is `reference.fixed_order_mean` (a fixed-order
  float64 sum rounded once), the same on every machine. So: every byte equals bitsandbytes' when
  its offset comes out as ours; otherwise the offset is within 1 fp32 ulp of theirs, and the
  nested codes and nested absmax equal theirs given their offset (tests/test_quant.py checks
  exactly this). Either file decodes the same way in both libraries.
- the 8-bit codes of double quantisation follow bitsandbytes' CPU quantiser (a 65,536-point grid)
  on every device, so a checkpoint holds the same bytes whichever device or thread count
  quantised it (tests/test_offset.py); bitsandbytes' CUDA quantiser searches exact midpoints and
  picks the neighbouring code for the few constants within half a grid step (1.5e-5) of a
  midpoint. `tools/gpu_check.py` reports offset differences apart from code differences against
  bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import os

import torch

from qlora.quant import reference
from qlora.quant.codebooks import sorted_bounds
from qlora.quant.state import QuantState

BACKENDS = ("native", "triton", "reference")
ENV_VAR = "QLORA_BACKEND"
REFERENCE_CHUNK = 1 << 22  # elements per reference-kernel pass


class Reference:
    """Pure PyTorch, any device; dequantises in bounded chunks."""

    name = "reference"
    checks_finite = False  # the caller checks its input

    def quantize(self, x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks of whole blocks (an even number of elements), so the temporaries (fp32 copy,
        scaled values, int32 ranks: ~13 bytes an element) stay bounded for a large weight."""
        step = max(2 * blocksize, REFERENCE_CHUNK - REFERENCE_CHUNK % (2 * blocksize))
        parts = [reference.quantize_4bit_blocks(x[i:i + step], blocksize, quant_type) for i in range(0, x.numel(), step)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts])

    def scales(self, state: QuantState) -> torch.Tensor:
        """fp32 absmax per block, the double quantisation decoded."""
        if state.state2 is None:
            return state.absmax.float()
        s = state.state2
        return reference.double_dequantize(state.absmax, s.absmax, s.code, s.offset, s.blocksize)

    def dequantize(self, data: torch.Tensor, state: QuantState, out: torch.Tensor) -> None:
        """Note: dequantise in chunks. The reference kernel's temporaries (int64 codes, fp32 values
        and scales: ~20 bytes per element) would otherwise be 10x the bf16 output for a large
        weight, on the GPU too; chunks of whole blocks and whole bytes bound them to ~80 MB."""
        scales = self.scales(state)
        n, blocksize = state.numel, state.blocksize
        step = max(2 * blocksize, REFERENCE_CHUNK - REFERENCE_CHUNK % (2 * blocksize))
        for start in range(0, n, step):
            stop = min(n, start + step)
            out[start:stop] = reference.dequantize_4bit_blocks(
                data[start // 2:(stop + 1) // 2], scales[start // blocksize:-(-stop // blocksize)], state.code,
                blocksize, stop - start, out.dtype)

    gemv = None


class Native(Reference):
    """The C kernels on CPU tensors."""

    name = "native"
    checks_finite = True  # finds NaN / Inf while scanning for the absmax

    def __init__(self, module) -> None:
        self.kernels = module

    def quantize(self, x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        bounds, order = sorted_bounds(quant_type)
        n = x.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
        return self.kernels.quantize_4bit(x, blocksize, bounds, order, packed, absmax)

    def scales(self, state: QuantState) -> torch.Tensor:
        if state.state2 is None:
            return state.absmax.float()
        s = state.state2
        out = torch.empty(state.absmax.numel(), dtype=torch.float32)
        return self.kernels.dequantize_8bit(state.absmax, s.code.float(), s.absmax, s.blocksize, float(s.offset), out)

    def dequantize(self, data: torch.Tensor, state: QuantState, out: torch.Tensor) -> None:
        self.kernels.dequantize_4bit(data, self.scales(state), state.code.float(), state.blocksize, out)

    def gemv(self, x: torch.Tensor, data: torch.Tensor, state: QuantState, out: torch.Tensor) -> None:
        n_out, n_in = state.shape
        self.kernels.gemv_4bit(x, data, self.scales(state), state.code.float(), state.blocksize, n_out, n_in, out)


class Triton(Reference):
    """Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    checks_finite = False

    def __init__(self, module) -> None:
        self.kernels = module

    @staticmethod
    def _nested(state: QuantState):
        s = state.state2
        return None if s is None else (s.absmax, s.code.float(), s.offset.float(), s.blocksize)

    def quantize(self, x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        bounds, order = sorted_bounds(quant_type)
        return self.kernels.quantize_4bit(x, blocksize, bounds.to(x.device), order.to(x.device))

    def dequantize(self, data: torch.Tensor, state: QuantState, out: torch.Tensor) -> None:
        absmax = state.absmax if state.state2 is not None else state.absmax.float()
        self.kernels.dequantize_4bit(data, absmax, state.code.float(), state.blocksize, out, self._nested(state))

    def gemv(self, x: torch.Tensor, data: torch.Tensor, state: QuantState, out: torch.Tensor) -> None:
        n_out, n_in = state.shape
        absmax = state.absmax if state.state2 is not None else state.absmax.float()
        self.kernels.gemv_4bit(x, data, absmax, state.code.float(), state.blocksize, n_out, n_in, out,
                               self._nested(state))


REFERENCE = Reference()


def _native() -> Native | None:
    """The native CPU kernels, or None when disabled (QLORA_NATIVE=0) or not built."""
    try:
        from qlora.quant import native
    except ImportError:
        return None
    return Native(native) if native.available() else None


def _triton() -> Triton | None:
    """The Triton kernels, or None when triton is missing (or there is neither CUDA nor the interpreter)."""
    try:
        from qlora.quant import triton as kernels
    except ImportError:
        return None
    return Triton(kernels) if kernels.available() else None


def select(device: torch.device) -> Reference:
    """The backend for tensors on `device` (see module docstring)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        return _forced(forced, device)
    if device.type == "cpu":
        return _native() or REFERENCE
    if device.type == "cuda":
        return _triton() or REFERENCE
    return REFERENCE


def _forced(name: str, device: torch.device) -> Reference:
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {BACKENDS}")
    if name == "reference":
        return REFERENCE
    if name == "native" and device.type != "cpu":
        raise ValueError(f"{ENV_VAR}=native runs on CPU tensors only, got a tensor on {device}")
    backend = _native() if name == "native" else _triton()
    if backend is None:
        why = ("the C kernels did not build (or QLORA_NATIVE=0)" if name == "native" else
               "triton is not installed, or there is no CUDA device and TRITON_INTERPRET=1 is not set")
        raise ValueError(f"{ENV_VAR}={name}: unavailable: {why}")
    return backend
