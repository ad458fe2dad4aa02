"""Public 4-bit API: `quantize_4bit`, `dequantize_4bit`, `matmul_4bit`.

Each call validates its input, then hands flat tensors to the kernel backend that
`qlora.quant.backends.select` picks for the tensor's device (native C on CPU, Triton on CUDA, the
pure-PyTorch reference elsewhere; `QLORA_BACKEND` forces one). Every backend produces
bitsandbytes' format bit for bit; bitsandbytes itself is never imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora.choices import BLOCKSIZES, QUANT_TYPES
from qlora.quant import backends, reference
from qlora.quant.codebooks import codebook, dynamic_map
from qlora.quant.format import COMPUTE_DTYPES as FLOAT_DTYPES
from qlora.quant.format import STORAGE_DTYPES
from qlora.quant.state import NestedState, QuantState

GEMV_MAX_ROWS = 8  # up to this many input rows, matmul reads the packed weight directly (decode)
# Above this block scale, double quantisation's `code * absmax2 + offset` may round past the fp32
# maximum (3.4e38), so such states are decoded once and checked.
LARGE_SCALE = 1e38


def _check_blocksize(blocksize: int, what: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{what} must be an int, one of {BLOCKSIZES}, got {blocksize!r}")


def _check_quantize_args(x: torch.Tensor, quant_type: str, blocksize: int, quant_storage: torch.dtype,
                         check_finite: bool = True) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x.dtype must be one of float32, float16, bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to quantise")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_blocksize(blocksize)
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
    # A sum is finite when every element is (cheap); only a non-finite sum (maybe an overflow of
    # large finite values) pays for the exact element check.
    if check_finite and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x contains {bad} NaN/Inf value(s); 4-bit quantisation needs finite values")


def quantize_4bit(x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Quantise `x` blockwise to 4 bits.

    Returns `packed`, shape ((n+1)//2 bytes viewed as `quant_storage`, 1), and the `QuantState`
    (fp32 absmax per block, or their 8-bit codes + nested scales with `double_quant`).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__} (use torch.as_tensor(x))")
    kernels = backends.select(x.device)
    _check_quantize_args(x, quant_type, blocksize, quant_storage, check_finite=not kernels.checks_finite)
    n = x.numel()
    n_bytes = (n + 1) // 2
    if n_bytes % torch.empty((), dtype=quant_storage).element_size():
        raise ValueError(f"{n_bytes} packed bytes cannot be viewed as {quant_storage}; "
                         f"use quant_storage=torch.uint8 for tensors with {n} elements")
    packed, absmax = kernels.quantize(x.contiguous().reshape(-1), blocksize, quant_type)

    state2 = None
    if double_quant:
        large = bool(absmax.max() > LARGE_SCALE)
        codes, nested_absmax, offset = reference.double_quantize(absmax)
        state2 = NestedState(nested_absmax, dynamic_map().to(x.device, copy=True), offset)
        if large and not torch.isfinite(reference.double_dequantize(codes, nested_absmax, state2.code, offset)).all():
            raise ValueError(f"x has values up to {float(absmax.max()):.3g}, too close to the float32 maximum for "
                             "double quantisation of the block scales; use double_quant=False")
        absmax = codes
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=codebook(quant_type, x.device), state2=state2)
    return packed.view(quant_storage).unsqueeze(1), state


def block_scales(state: QuantState) -> torch.Tensor:
    """fp32 absmax per block, decoding the double quantisation if present."""
    return backends.select(state.absmax.device).scales(state)


def _packed_bytes(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor, checked against the state."""
    if not isinstance(state, QuantState):
        raise ValueError(f"state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor):
        raise ValueError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    _check_blocksize(state.blocksize, "state.blocksize")
    data = packed.contiguous().reshape(-1).view(torch.uint8)
    expected = (state.numel + 1) // 2
    if data.numel() != expected:
        raise ValueError(f"packed tensor holds {data.numel()} bytes but the state's shape "
                         f"{tuple(state.shape)} needs {expected}")
    if state.absmax.numel() != state.n_blocks:
        raise ValueError(f"state has {state.absmax.numel()} absmax values but shape {tuple(state.shape)} "
                         f"with blocksize {state.blocksize} needs {state.n_blocks}")
    return data


def dequantize_4bit(packed: torch.Tensor, state: QuantState, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed codes -> tensor of `state.shape` in `state.dtype` (or in `out`, reused, any float dtype)."""
    data = _packed_bytes(packed, state)
    if out is None:
        out = torch.empty(state.shape, dtype=state.dtype, device=data.device)
    elif out.numel() != state.numel or out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out must be a float tensor with {state.numel} elements, "
                         f"got shape {tuple(out.shape)} dtype {out.dtype}")
    target = out.view(-1) if out.is_contiguous() else torch.empty(state.numel, dtype=out.dtype, device=out.device)
    backends.select(data.device).dequantize(data, state, target)
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.view(out.shape))
    return out if out.shape == state.shape else out.view(state.shape)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for a 4-bit W of shape (out_features, in_features), in x's dtype.

    For a few rows (token-by-token decoding) a backend with a matvec (native, triton) reads the
    packed weight directly and never materialises W; otherwise W is dequantised once into x's dtype,
    into `workspace` when given (a reused buffer of W's shape and x's dtype), else a new tensor.
    """
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight state, got shape {tuple(state.shape)}")
    n_out, n_in = state.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {n_in}")
    rows = x.numel() // n_in
    kernels = backends.select(x.device)
    if kernels.gemv is not None and rows <= GEMV_MAX_ROWS and x.dtype in FLOAT_DTYPES:
        y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
        kernels.gemv(x.reshape(rows, n_in).contiguous(), _packed_bytes(packed, state), state, y)
        y = y.reshape(*x.shape[:-1], n_out)
        return y if bias is None else y + bias.to(y.dtype)
    if workspace is None:
        workspace = torch.empty(state.shape, dtype=x.dtype, device=x.device)
    weight = dequantize_4bit(packed, state, out=workspace)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
