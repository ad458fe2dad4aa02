"""torch dtypes by the names recipes, the CLI and saved JSON use (one map, both directions)."""

from __future__ import annotations

import torch

from qlora.choices import DTYPES, HF_DTYPE_NAMES
from qlora.errors import UsageError

TORCH_DTYPES = {name: getattr(torch, HF_DTYPE_NAMES[name]) for name in DTYPES}
"""Short name ("bf16") -> torch dtype."""
FLOAT_DTYPES = tuple(TORCH_DTYPES.values())


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a short name (`bf16`, `fp16`, `fp32`), or a UsageError naming the choices."""
    if name not in TORCH_DTYPES:
        raise UsageError(f"dtype {name!r} is not one of {list(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def hf_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", the spelling of config.json and bitsandbytes' quant state."""
    name = str(dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in FLOAT_DTYPES]}")
    return name


def from_hf_name(name: str) -> torch.dtype:
    """Inverse of `hf_name`: "bfloat16" -> torch.bfloat16 (only the three float dtypes)."""
    dtype = getattr(torch, str(name), None)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(HF_DTYPE_NAMES.values())}")
    return dtype


def short_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bf16", the spelling of recipes and the CLI."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in FLOAT_DTYPES]}")
