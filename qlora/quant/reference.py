"""Pure-PyTorch reference kernels for blockwise 4-bit and 8-bit quantisation (any device).

These are the oracle for the fast paths and match bitsandbytes 0.50.x bit for bit.

4-bit quantise (per block of `blocksize` consecutive elements of the flattened tensor):
    absmax_b = max_i |x_i|
    s_i      = clamp(x_i * (1 / absmax_b), -1, 1)          # fp32; see Note: partial block
    q_i      = order[#{midpoints < s_i}]                    # nearest level, ties to the lower one
and two codes share a byte, element 2i in the HIGH nibble, 2i+1 in the low one (odd n: zero pad).

4-bit dequantise:  x_i ~= table[q_i] * absmax_b, in fp32, then rounded (RNE) to the output dtype.

8-bit blockwise (for double quantisation of the absmax constants, block 256, the dynamic map).
bitsandbytes' CPU kernel does not search the 256-entry map directly: it maps s in [-1, 1] to a
16-bit grid position  g = trunc(fma(65535, (s + 1) / 2, 0.5))  and reads a 65,536-entry table that
holds, for each grid value  v_g = 2g / 65535 - 1,  the number of map midpoints below v_g. Values
within half a grid step (1.5e-5) of a midpoint can thus land on the farther level; we reproduce
that table so that our constants are identical, and the extra error it adds to the absmax
constants is far below the 8-bit rounding error itself. An all-zero block stores absmax 0 and
code 0.

Note: partial block. bitsandbytes scales full 4-bit blocks by multiplying with the fp32 reciprocal
of absmax, but the trailing partial block by dividing by its absmax (clamped to 1e-38, which is
also what it stores). The two differ in the last ulp now and then; we copy both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qlora.quant.codebooks import dynamic_map, sorted_bounds

_TINY = 1e-38  # bitsandbytes' clamp on absmax before taking its reciprocal


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (2m,) -> bytes (m,), element 2i in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bytes ((n+1)//2,) -> int64 codes (n,), inverse of `pack_nibbles`."""
    packed = packed.reshape(-1).to(torch.int64)
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]


def quantize_4bit_blocks(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened float tensor -> (packed uint8 ((n+1)//2,), fp32 absmax (n_blocks,))."""
    bounds, order = sorted_bounds(quant_type)
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # the pad nibble is the code of 0.0, as in bitsandbytes
    ranks = torch.bucketize(scaled, bounds.to(x.device), out_int32=True)
    codes = order.to(x.device)[ranks]
    return pack_nibbles(codes), absmax


def dequantize_4bit_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                           n: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed bytes + fp32 absmax -> flat tensor of `n` elements in `dtype`."""
    values = code.float()[unpack_nibbles(packed, n)]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).to(dtype)


@functools.lru_cache(maxsize=None)
def _grid_table(device: str) -> torch.Tensor:
    """65,536-entry grid -> dynamic-map index table (see module docstring)."""
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    g = torch.arange(65536, dtype=torch.float32)
    grid_values = (g + g) / 65535.0 - 1.0
    return torch.bucketize(grid_values, midpoints).clamp(max=255).to(torch.uint8).to(device)


def quantize_8bit_blocks(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n,) -> (uint8 codes in the dynamic map (n,), fp32 absmax (n_blocks,))."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    half = ((blocks * inverse.unsqueeze(1)).clamp(-1, 1) + 1.0) * 0.5
    # fma(65535, half, 0.5) rounds once: exact in float64, then one rounding to float32. A NaN
    # (0 * inf when a subnormal absmax has no finite reciprocal) truncates to 0x80000000 in the
    # C kernel, whose low 16 bits index grid entry 0; nan_to_num reproduces that.
    grid = torch.nan_to_num((half.double() * 65535.0 + 0.5).float(), nan=0.0).to(torch.int64)
    codes = _grid_table(str(x.device))[grid]
    codes = torch.where((absmax > 0).unsqueeze(1), codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax


def dequantize_8bit_blocks(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                           blocksize: int = 256) -> torch.Tensor:
    """uint8 codes (n,) -> fp32 values code[q] * absmax_b."""
    n = codes.numel()
    return code.float()[codes.reshape(-1).to(torch.int64)] * absmax.float().repeat_interleave(blocksize)[:n]


def fixed_order_mean(x: torch.Tensor) -> torch.Tensor:
    """The fp32 mean of `x`, the same bits on every device and at every thread count.

    Note: the offset is stored. `x.mean()` in fp32 lets the reduction kernel pick the summation
    order (vector lanes, one partial sum per thread, CUDA's tree), and the order changes the last
    bits: measured with torch 2.13 on CPU, the fp32 means of 3.67M block scales (an 8192x28672
    weight) at 1, 2 and 8 threads differ in 15 of 20 random draws. Here the order is fixed: a
    pairwise sum in float64 built from elementwise adds of the two halves of a zero-padded vector
    (no reduction kernel, so nothing depends on the device or the threads), divided by n in
    float64 and rounded once to fp32. IEEE float64 adds and divides are correctly rounded on every
    CPU and GPU, so the result is reproducible bit for bit; its error (~log2(n) float64 ulps) is
    far below an fp32 ulp, so it is also the correctly rounded mean in all but rare ties, and it
    cannot overflow for fp32 inputs. Devices without float64 (MPS) sum on the CPU.
    """
    v = x.detach().reshape(-1)
    n = v.numel()
    v = v.to("cpu" if v.device.type == "mps" else v.device, torch.float64)
    while v.numel() > 1:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[0::2] + v[1::2]
    return (v[0] / n).float().to(x.device)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256, offset: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax -> (uint8 codes, fp32 nested absmax, fp32 offset): quantises absmax - offset.

    `offset` defaults to `fixed_order_mean(absmax)`; pass one (bitsandbytes' own, say) to get the
    codes that offset gives."""
    offset = fixed_order_mean(absmax) if offset is None else offset.to(absmax.device, torch.float32)
    codes, nested_absmax = quantize_8bit_blocks(absmax - offset, blocksize)
    return codes, nested_absmax, offset


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                      offset: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Inverse of `double_quantize` (fp32): code[q] * nested_absmax_b + offset."""
    return dequantize_8bit_blocks(codes, nested_absmax, code, blocksize) + offset
