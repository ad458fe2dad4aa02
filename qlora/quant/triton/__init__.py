"""Triton GPU path for blockwise 4-bit dequantise / quantise / matrix-vector product.

Same format and the same bits as `qlora.quant.reference` (bitsandbytes 0.50.x): see `kernels.py`
for the exactness rules. These functions work on flat, contiguous tensors and check them cheaply;
the public layer (`qlora.quant.api`) owns shapes, QuantState and the finiteness check of inputs
(non-finite values give unspecified codes here, as the reference would give NaN-derived ones).

`available()` is True when triton imports and either CUDA is present or `TRITON_INTERPRET=1`
(Triton's interpreter, which runs the kernels on CPU tensors; the tests use it). The interpreter
is chosen when the kernels are first imported, so set the variable before the first call.

Tiles: one program handles whole blocks, `TILE_ELEMS` elements at a time (`INTERPRET_TILE_ELEMS`
under the interpreter, where every program is a Python loop iteration, so fewer and larger tiles
are much faster). The gemv gives each program `GEMV_BLOCK_N` output features and walks the input
features `GEMV_BLOCK_K` at a time (fewer for more input rows, to bound registers).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "dequantize_4bit", "gemv_4bit", "quantize_4bit"]

TILE_ELEMS = 4096  # elements per program on a GPU (a power of two)
INTERPRET_TILE_ELEMS = 1 << 16
NUM_WARPS = 4  # dequantise and gemv
QUANTIZE_NUM_WARPS = 8
GEMV_BLOCK_N, GEMV_BLOCK_K = 8, 1024  # GPU; BLOCK_K is divided by the padded row count
INTERPRET_GEMV_BLOCK_N, INTERPRET_GEMV_BLOCK_K = 64, 1024
GEMV_ANY_BLOCK_K = 256  # odd n_in (rare): one nibble and scale per element
GEMV_MAX_ROWS = 8  # rows per launch; more rows are done 8 at a time
MAX_BLOCKSIZE = 4096  # bitsandbytes' largest; bigger blocks would need bigger tiles

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' *_KIND constexprs


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """triton importable AND (torch.cuda.is_available() or TRITON_INTERPRET == '1')."""
    return _triton_importable() and (torch.cuda.is_available() or _interpret())


def _kernels():
    if not available():
        raise RuntimeError("Triton 4-bit kernels are not available (need triton and CUDA, or "
                           "TRITON_INTERPRET=1); check available() first")
    from qlora.quant.triton import kernels

    return kernels


# ---------------------------------------------------------------------------------- validation


def _check(t, name: str, dtypes: tuple[torch.dtype, ...], numel: int | None, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other tensors")


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _interpret():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {device}")


def _check_blocksize(blocksize: int) -> None:
    if (not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2
            or blocksize > MAX_BLOCKSIZE or blocksize & (blocksize - 1)):
        raise ValueError(f"blocksize must be a power of two in [2, {MAX_BLOCKSIZE}], got {blocksize!r}")


def _nested_args(nested, n_blocks: int, device: torch.device, absmax: torch.Tensor):
    """(ncode, nabs, offset, nb) kernel arguments; dummies (never read) without nesting."""
    if nested is None:
        return absmax, absmax, absmax, 1
    if not isinstance(nested, (tuple, list)) or len(nested) != 4:
        raise ValueError("nested must be (nested_absmax, nested_code, offset, nested_blocksize)")
    nested_absmax, nested_code, offset, nb = nested
    if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1:
        raise ValueError(f"nested blocksize must be a positive int, got {nb!r}")
    _check(nested_absmax, "nested_absmax", (torch.float32,), -(-n_blocks // nb), device)
    _check(nested_code, "nested_code", (torch.float32,), 256, device)
    _check(offset, "offset", (torch.float32,), 1, device)
    return nested_code, nested_absmax, offset, nb


def _tile_blocks(blocksize: int) -> int:
    tile = INTERPRET_TILE_ELEMS if _interpret() else TILE_ELEMS
    return max(1, tile // blocksize)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as int16 bit patterns (see kernels.py)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# ------------------------------------------------------------------------------------- kernels


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
                    ) -> torch.Tensor:
    """Writes the n = out.numel() values `code[q_i] * scale[i // blocksize]` (fp32, then rounded to
    nearest even in out.dtype) into `out` and returns it.

    packed: uint8 ((n+1)//2,); absmax: fp32 (n_blocks,), or with `nested` the uint8 codes (n_blocks,);
    code: fp32 (16,); out: contiguous fp32 / bf16 / fp16 with n elements. nested = (nested_absmax
    fp32 (ceil(n_blocks/nb),), nested_code fp32 (256,), offset fp32 0-dim, nb): the scales
    `nested_code[absmax[b]] * nested_absmax[b // nb] + offset` are decoded in the same launch.
    """
    _check_blocksize(blocksize)
    _check(out, "out", _FLOATS, None, None)
    n = out.numel()
    device = out.device
    _check_device(device)
    n_blocks = -(-n // blocksize)
    _check(packed, "packed", (torch.uint8,), (n + 1) // 2, device)
    _check(absmax, "absmax", (torch.float32,) if nested is None else (torch.uint8,), n_blocks, device)
    _check(code, "code", (torch.float32,), 16, device)
    ncode, nabs, offset, nb = _nested_args(nested, n_blocks, device, absmax)
    if n == 0:
        return out
    k = _kernels()
    bpt = _tile_blocks(blocksize)
    k.dequantize_kernel[(_cdiv(n_blocks, bpt),)](
        packed, absmax, code, _bits(out), n, (n + 1) // 2, n_blocks, ncode, nabs, offset, nb,
        BS=blocksize, BPT=bpt, NESTED=nested is not None, OUT_KIND=_KINDS[out.dtype],
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantisation of the n elements of `x`, identical to
    `reference.quantize_4bit_blocks`.

    x: contiguous fp32 / bf16 / fp16 (read in its own dtype, tile by tile: no fp32 copy);
    bounds: fp32 (15,) sorted midpoints; order: uint8 (16,) (`codebooks.sorted_bounds(quant_type)`).
    Returns (packed uint8 ((n+1)//2,), fp32 absmax (ceil(n/blocksize),)) on x's device.
    """
    _check_blocksize(blocksize)
    _check(x, "x", _FLOATS, None, None)
    device = x.device
    _check_device(device)
    _check(bounds, "bounds", (torch.float32,), 15, device)
    _check(order, "order", (torch.uint8,), 16, device)
    n = x.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    if n == 0:
        return packed, absmax
    k = _kernels()
    bpt = _tile_blocks(blocksize)
    k.quantize_kernel[(_cdiv(n_blocks, bpt),)](
        _bits(x), bounds, order, packed, absmax, n, (n + 1) // 2, n_blocks,
        BS=blocksize, BPT=bpt, IN_KIND=_KINDS[x.dtype], HAS_TAIL=n % blocksize != 0,
        num_warps=QUANTIZE_NUM_WARPS, enable_fp_fusion=False)
    return packed, absmax


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
              n_out: int, n_in: int, out: torch.Tensor,
              nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """y = x @ W.T for a packed 4-bit W (n_out, n_in), read directly (W is never materialised).

    x: (rows, n_in) contiguous fp32 / bf16 / fp16, rows <= 8 per launch (more rows are done 8 at a
    time, re-reading W); W's element (o, k) is flat element o * n_in + k of the 4-bit tensor
    (same packing, blocks and `nested` scales as `dequantize_4bit`), dequantised in fp32
    (`code[q] * scale`, not rounded to x.dtype); products accumulate in fp32 and the result is
    rounded to nearest even into `out`, (rows, n_out) of x.dtype. Returns out.
    """
    _check_blocksize(blocksize)
    for name, v in (("n_out", n_out), ("n_in", n_in)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    _check(x, "x", _FLOATS, None, None)
    device = x.device
    _check_device(device)
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must have shape (rows, n_in={n_in}), got {tuple(x.shape)}")
    rows = x.shape[0]
    n = n_out * n_in
    n_blocks = -(-n // blocksize)
    _check(packed, "packed", (torch.uint8,), (n + 1) // 2, device)
    _check(absmax, "absmax", (torch.float32,) if nested is None else (torch.uint8,), n_blocks, device)
    _check(code, "code", (torch.float32,), 16, device)
    _check(out, "out", (x.dtype,), rows * n_out, device)
    if out.dim() != 2 or out.shape[0] != rows:
        raise ValueError(f"out must have shape ({rows}, {n_out}), got {tuple(out.shape)}")
    ncode, nabs, offset, nb = _nested_args(nested, n_blocks, device, absmax)
    if rows == 0 or n_out == 0:
        return out
    if n_in == 0:
        return out.zero_()
    if min(rows, GEMV_MAX_ROWS) * n_in >= 2**31 or rows * n_out >= 2**31:
        raise ValueError("gemv_4bit: x or out has too many elements for 32-bit offsets")
    k = _kernels()
    interp = _interpret()
    block_n = INTERPRET_GEMV_BLOCK_N if interp else GEMV_BLOCK_N
    for r0 in range(0, rows, GEMV_MAX_ROWS):
        r1 = min(rows, r0 + GEMV_MAX_ROWS)
        rows_p2 = 1 << (r1 - r0 - 1).bit_length()
        block_k = max(64, (INTERPRET_GEMV_BLOCK_K if interp else GEMV_BLOCK_K) // rows_p2)
        xs, ys = x[r0:r1], out[r0:r1]
        nested_flag, kind = nested is not None, _KINDS[x.dtype]
        grid = (_cdiv(n_out, block_n),)
        pair_dtype = torch.int64 if x.dtype == torch.float32 else torch.int32
        if n_in % 2 == 0 and xs.data_ptr() % pair_dtype.itemsize == 0:
            # GROUP consecutive elements of a weight row share one block: the largest power of two
            # dividing n_in (every row then starts on a GROUP boundary), capped by the block and chunk
            group = min(blocksize, block_k, n_in & -n_in)
            if group < 16:  # many scales per chunk: a shorter chunk keeps them in registers
                block_k = min(block_k, GEMV_ANY_BLOCK_K)
            xpairs = xs.view(pair_dtype)  # x read two elements at a time
            k.gemv_even_kernel[grid](xpairs, packed, absmax, code, _bits(ys), r1 - r0, n_out, n_in,
                                     ncode, nabs, offset, nb, BS=blocksize, BLOCK_N=block_n, BLOCK_K=block_k,
                                     GROUP=group, ROWS_P2=rows_p2, NESTED=nested_flag, X_KIND=kind,
                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
        else:  # odd n_in, or x not aligned for pair reads
            k.gemv_any_kernel[grid](_bits(xs), packed, absmax, code, _bits(ys), r1 - r0, n_out, n_in,
                                    ncode, nabs, offset, nb, BS=blocksize, BLOCK_N=block_n,
                                    BLOCK_K=min(block_k, GEMV_ANY_BLOCK_K), ROWS_P2=rows_p2, NESTED=nested_flag,
                                    X_KIND=kind, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
