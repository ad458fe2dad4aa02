"""Fast CPU path for 4-bit dequantise / quantise / matrix-vector product (native C via ctypes).

`kernels4bit.c` is plain C (no torch headers, so it compiles in about a second) with AVX-512
intrinsics and a portable scalar twin. It is built on first use with the system C compiler
(`$CC`, else `cc`, else `gcc`) as `-O3 -march=native -fopenmp` into a cache folder
(`$QLORA_HOME/kernels`, default `~/.cache/qlora/kernels`). The file name carries a hash of the
source, the compiler, the flags and the CPU's feature flags, so a cache shared between machines
never loads a build made for another CPU; builds go to a temporary name and are renamed into place,
so concurrent first uses cannot load a half-written library.

Without a compiler (or when the build fails) one warning is issued and `available()` is False; the
caller then uses the pure-PyTorch reference. `QLORA_NATIVE=0` switches the native path off.

The functions here work on flat, contiguous CPU tensors and check them cheaply; the public layer
(`qlora.quant`) owns shapes, QuantState and double quantisation. Results are bit-identical to
bitsandbytes 0.50.2 (see the C file for the rules). ctypes releases the GIL during each call, and
each call uses `torch.get_num_threads()` OpenMP threads (torch's own libgomp, already loaded, is
the runtime the library binds to, so there is one thread pool in the process).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "cache_dir", "dequantize_4bit", "dequantize_8bit", "dropout", "gemv_4bit", "quantize_4bit"]

_SOURCE = Path(__file__).with_name("kernels4bit.c")
_ABI_VERSION = 4
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_loaded = False  # True once loading was attempted (successfully or not)


def available() -> bool:
    """True when the native kernels are enabled and built for this machine."""
    return _library() is not None


def cache_dir() -> Path:
    """Folder holding built kernels: `$QLORA_HOME/kernels`, default `~/.cache/qlora/kernels`."""
    home = os.environ.get("QLORA_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "qlora") / "kernels"


# ------------------------------------------------------------------------------------ building


def _compiler() -> str | None:
    """The C compiler: `$CC` when set (authoritative, even if missing), else `cc`, else `gcc`."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _flag_sets() -> list[tuple[str, ...]]:
    """Compiler flags to try in order: with OpenMP, then single-threaded (e.g. Apple clang).

    `QLORA_NATIVE_MARCH` (default `native`) picks the target; the tests set a baseline
    architecture to exercise the portable scalar code on an AVX-512 machine.
    """
    arch = f"-march={os.environ.get('QLORA_NATIVE_MARCH', 'native')}"
    base = ("-O3", arch, "-ffp-contract=off", "-shared", "-fPIC")  # no FMA: products round as in torch
    return [(*base, "-fopenmp"), base]


def _library_path(cc: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), cc.encode(), " ".join(flags).encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"kernels4bit-{key.hexdigest()[:20]}.so"


def _build(cc: str, flags: tuple[str, ...], target: Path) -> None:
    """Compiles the kernels to `target` atomically (temporary file, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qn_abi_version.restype = i32
    lib.qn_has_avx512.restype = i32
    lib.qn_dequantize_4bit.argtypes = [p, p, p, i64, i64, p, i32, i32]
    lib.qn_dequantize_4bit.restype = None
    lib.qn_dequantize_8bit.argtypes = [p, p, p, i64, i64, ctypes.c_float, p, i32]
    lib.qn_dequantize_8bit.restype = None
    lib.qn_quantize_4bit.argtypes = [p, i32, i64, i64, p, p, p, p, i32]
    lib.qn_quantize_4bit.restype = i64
    lib.qn_gemv_4bit.argtypes = [p, i64, p, p, p, i64, i64, i64, i32, p, i32, i32]
    lib.qn_gemv_4bit.restype = i32
    lib.qn_dropout.argtypes = [p, p, i32, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i32]
    lib.qn_dropout.restype = None


def _built_library(cc: str) -> Path:
    """Path of a cached build for this machine, building it on first use."""
    candidates = [(flags, _library_path(cc, flags)) for flags in _flag_sets()]
    for _, path in candidates:
        if path.exists():
            return path
    errors = []
    for flags, path in candidates:
        try:
            _build(cc, flags, path)
            return path
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL | None:
    if os.environ.get("QLORA_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    try:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install cc/gcc)")
        path = _built_library(cc)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.qn_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.qn_abi_version()}, expected {_ABI_VERSION}")
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"qlora: native 4-bit CPU kernels unavailable, using the slower PyTorch "
                      f"reference instead ({exc})", RuntimeWarning, stacklevel=4)
        return None


def _library() -> ctypes.CDLL | None:
    global _lib, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _load()
                _loaded = True
    return _lib


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("native 4-bit kernels are not available; check available() first")
    return lib


# ---------------------------------------------------------------------------------- validation


def _check(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], numel: int | None) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor, got device={t.device}, "
                         f"contiguous={t.is_contiguous()}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()}")


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even int >= 2, got {blocksize!r}")


_FLOATS = tuple(_DTYPE_CODES)


# ------------------------------------------------------------------------------------- kernels


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Writes the `out.numel()` dequantised values `code[q_i] * absmax[i // blocksize]` into `out`.

    packed: uint8, (n + 1) // 2 bytes; absmax: fp32 (ceil(n / blocksize),); code: fp32 (16,);
    out: fp32 / bf16 / fp16, n elements (any shape, contiguous). Returns `out`.
    """
    n = out.numel()
    _check_blocksize(blocksize)
    _check(out, "out", _FLOATS, None)
    _check(packed, "packed", (torch.uint8,), (n + 1) // 2)
    _check(absmax, "absmax", (torch.float32,), -(-n // blocksize))
    _check(code, "code", (torch.float32,), 16)
    _require().qn_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), n,
                                  blocksize, out.data_ptr(), _DTYPE_CODES[out.dtype],
                                  torch.get_num_threads())
    return out


def dequantize_8bit(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                    offset: float, out: torch.Tensor) -> torch.Tensor:
    """Decodes double-quantised scales: out[i] = code[codes[i]] * absmax[i // blocksize] + offset.

    codes: uint8 (n,); code: fp32 (256,) (bitsandbytes' dynamic map); absmax: fp32
    ceil(n / blocksize); offset: the fp32 mean subtracted before quantising; out: fp32 (n,).
    fp32 arithmetic with a rounding after the product and after the sum, as in PyTorch.
    """
    n = codes.numel()
    _check_blocksize(blocksize)
    _check(codes, "codes", (torch.uint8,), None)
    _check(code, "code", (torch.float32,), 256)
    _check(absmax, "absmax", (torch.float32,), -(-n // blocksize))
    _check(out, "out", (torch.float32,), n)
    _require().qn_dequantize_8bit(codes.data_ptr(), code.data_ptr(), absmax.data_ptr(), n, blocksize,
                                  float(offset), out.data_ptr(), torch.get_num_threads())
    return out


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor,
                  packed_out: torch.Tensor, absmax_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantisation of the n elements of `x`, bit-identical to bitsandbytes.

    x: fp32 / bf16 / fp16 (contiguous); a NaN / Inf raises ValueError (found while scanning for the
    absmax, so callers need no separate check); bounds: fp32 (15,) sorted midpoints of the sorted
    code; order: uint8 (16,), sorted rank -> code index; packed_out: uint8 (n + 1) // 2;
    absmax_out: fp32 ceil(n / blocksize). Returns (packed_out, absmax_out).
    """
    n = x.numel()
    _check_blocksize(blocksize)
    _check(x, "x", _FLOATS, None)
    _check(bounds, "bounds", (torch.float32,), 15)
    _check(order, "order", (torch.uint8,), 16)
    _check(packed_out, "packed_out", (torch.uint8,), (n + 1) // 2)
    _check(absmax_out, "absmax_out", (torch.float32,), -(-n // blocksize))
    nonfinite = _require().qn_quantize_4bit(x.data_ptr(), _DTYPE_CODES[x.dtype], n, blocksize,
                                            bounds.data_ptr(), order.data_ptr(), packed_out.data_ptr(),
                                            absmax_out.data_ptr(), torch.get_num_threads())
    if nonfinite:
        raise ValueError(f"x contains {nonfinite} NaN/Inf value(s); 4-bit quantisation needs finite values")
    return packed_out, absmax_out


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              blocksize: int, N: int, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for a packed 4-bit weight W (N, K), without materialising W.

    x: (m, K) fp32 / bf16 / fp16, contiguous, m small (any m works; rows go 8 at a time); W's
    element (o, k) is flat element o * K + k, dequantised to x.dtype, and products accumulate in
    fp32. out: (m, N) of x.dtype (allocated when None). Returns out.
    """
    _check_blocksize(blocksize)
    _check(x, "x", _FLOATS, None)
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must have shape (m, K={K}), got {tuple(x.shape)}")
    m = x.shape[0]
    _check(packed, "packed", (torch.uint8,), (N * K + 1) // 2)
    _check(absmax, "absmax", (torch.float32,), -(-(N * K) // blocksize))
    _check(code, "code", (torch.float32,), 16)
    if out is None:
        out = torch.empty(m, N, dtype=x.dtype)
    _check(out, "out", (x.dtype,), m * N)
    x32 = x if x.dtype == torch.float32 else x.float()
    dtype = _DTYPE_CODES[x.dtype]
    status = _require().qn_gemv_4bit(x32.data_ptr(), m, packed.data_ptr(), absmax.data_ptr(),
                                     code.data_ptr(), blocksize, N, K, dtype, out.data_ptr(), dtype,
                                     torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"gemv_4bit could not allocate {m * K * 4} bytes of scratch")
    return out


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverted dropout with a mask that is a pure function of (`seed`, element index).

    out = x * keep / (1 - p) (the product in fp32, rounded once to x's dtype), where element i is
    dropped when a 32-bit hash of (seed, i) is < p * 2**32. Calling it again with the same seed on the
    gradient is the backward pass. x: contiguous fp32 / bf16 / fp16 CPU tensor; 0 <= p < 1.
    """
    _check(x, "x", _FLOATS, None)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r}; expected 0 <= p < 1")
    out = torch.empty_like(x) if out is None else out
    _check(out, "out", (x.dtype,), x.numel())
    threshold = min(int(round(p * 2**32)), 2**32 - 1)
    _require().qn_dropout(x.data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype], x.numel(), seed & (2**64 - 1),
                          threshold, 1.0 / (1.0 - p), torch.get_num_threads())
    return out
