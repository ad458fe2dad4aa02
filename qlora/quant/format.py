"""`QuantFormat`: how a frozen weight is stored in 4 bits and computed with, as one value.

The recipe's `quant` section, `Linear4bit`, the stream loader, the exporter and the accuracy report
all carry this one frozen dataclass instead of five loose arguments:

    quant_type     the 16-level codebook: nf4 (normal quantiles), fp4 (E2M1) or int4
    blocksize      consecutive weights sharing one absmax scale (32..4096, a power of two)
    double_quant   the absmax scales themselves stored as 8-bit codes (blocks of 256) + fp32 scales
    quant_storage  dtype the packed bytes are viewed as (uint8; bf16 so FSDP can shard them)
    compute_dtype  dtype of the matmul: inputs are cast to it and the weight is decoded into it

Storage cost per weight: 4 bits + 32/blocksize (fp32 scale) or, with double quantisation,
8/blocksize + 32/(256*blocksize) bits: 4.127 bits at block 64 (`bits_per_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.choices import BLOCKSIZES, QUANT_TYPES
from qlora.dtypes import FLOAT_DTYPES as COMPUTE_DTYPES

STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class QuantFormat:
    """A 4-bit storage format plus the compute dtype (see module docstring)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        checks = (("quant_type", QUANT_TYPES), ("blocksize", BLOCKSIZES),
                  ("quant_storage", STORAGE_DTYPES), ("compute_dtype", COMPUTE_DTYPES))
        for name, allowed in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or value not in allowed:
                raise ValueError(f"QuantFormat.{name}={value!r} is not allowed; expected one of {allowed}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantFormat.double_quant={self.double_quant!r}; expected a bool")

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight: the 4-bit code plus the share of its block's scale."""
        if self.double_quant:
            return 4 + 8 / self.blocksize + 32 / (256 * self.blocksize)
        return 4 + 32 / self.blocksize
