"""The 16-entry 4-bit codebooks (NF4, FP4, Int4) and the signed 8-bit dynamic map.

A 4-bit code is an index into a table of 16 fp32 values in [-1, 1]; a block of weights is stored as
indices plus one scale (its absmax), and dequantises as `table[index] * absmax`.

NF4 (NormalFloat, QLoRA paper sec. 3): the levels are quantiles of N(0, 1), so each level is hit
equally often by normally distributed weights, which is what trained weights roughly are. Eight
positive levels take the quantiles of `linspace(offset, 0.5, 9)[:-1]`, seven negative ones those of
`linspace(offset, 0.5, 8)[:-1]`, plus an exact zero; the set is normalised by its maximum so that it
spans [-1, 1]. `offset = 0.9677083` is the bitsandbytes choice (the mean of the two quantiles
`1 - 1/(2*15)` and `1 - 1/(2*16)`, so the outermost level is neither 1 sigma clipped nor wasted).
We rebuild it from `scipy.stats.norm.ppf` with the same fp32 steps bitsandbytes used; a test checks
the result against bitsandbytes' published 16-value table, bit for bit.

FP4 (E2M1): 1 sign bit (bit 3), 2 exponent bits and 1 mantissa bit, with bitsandbytes' exponent
layout `value = (1 + m/2) * 2**(4 - e)` for e in 1..3, subnormal `m * 0.0625` for e = 0, normalised
by the largest magnitude (12). The index IS the bit pattern, so the table is not sorted.

Int4: symmetric integers -7..7 divided by 7 (index = bit pattern of bitsandbytes' table, with a
duplicate zero). Uniform levels waste resolution on the tails of a bell-shaped distribution; it is
here as the QLoRA paper's baseline (no bitsandbytes twin exists for it).

The signed 8-bit dynamic map (Dettmers 2015, "8-Bit Approximations for Parallelism") quantises the
absmax constants in double quantisation: a sign bit, a unary-coded decimal exponent and a linear
fraction, so small and large constants both keep ~2 significant digits.
"""

from __future__ import annotations

import functools

import torch

from qlora.choices import QUANT_TYPES

NF4_OFFSET = 0.9677083


def normal_float_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels (fp32, ascending), built from normal quantiles with scipy."""
    from scipy.stats import norm

    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    levels = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return levels / levels.max()


def fp4_levels() -> torch.Tensor:
    """The 16 FP4 (E2M1) values indexed by bit pattern, normalised to [-1, 1]."""
    magnitudes = []
    for bits in range(8):
        exponent, mantissa = bits >> 1, bits & 1
        if exponent == 0:
            magnitudes.append(mantissa * 0.0625)
        else:
            magnitudes.append((1 + mantissa / 2) * 2.0 ** (4 - exponent))
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def int4_levels() -> torch.Tensor:
    """Symmetric integers 7..0, -0..-7 divided by 7, indexed like bitsandbytes' int4 table."""
    values = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32)
    return values / 7.0


@functools.lru_cache(maxsize=None)
def _cpu_codebook(quant_type: str) -> torch.Tensor:
    builders = {"nf4": normal_float_levels, "fp4": fp4_levels, "int4": int4_levels}
    return builders[quant_type]()


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh copy of the 16-entry fp32 table for `quant_type` ("nf4", "fp4" or "int4") on `device`.

    Each quantised tensor owns its table: shared storage would make safetensors refuse a state
    dict with two layers, and transformers treat the tables as tied weights.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return _cpu_codebook(quant_type).to(device, copy=True)


@functools.lru_cache(maxsize=None)
def sorted_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order) for nearest-level search on the CPU.

    `midpoints[i]` is the fp32 midpoint between the i-th and (i+1)-th smallest levels; the rank of a
    value is the number of midpoints strictly below it (so a tie goes to the lower level), and
    `order[rank]` is the table index of that level.
    """
    table = _cpu_codebook(quant_type)
    order = torch.argsort(table, stable=True)
    levels = table[order]
    return (levels[:-1] + levels[1:]) / 2, order.to(torch.uint8)


@functools.lru_cache(maxsize=None)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 fp32 values, ascending)."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)
