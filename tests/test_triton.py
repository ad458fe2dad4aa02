"""Triton 4-bit kernels (`qlora.quant.triton`) against the PyTorch reference, bit for bit.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), which executes each program with numpy on CPU tensors: sizes are kept small, and the
launch code picks large tiles there so that a call is a handful of programs. One test per kernel
shrinks the tiles to the GPU sizes (and below) so that multi-program offsets are exercised too.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also set by conftest.py, before triton is imported
pytest.importorskip("triton")

from qlora.quant import codebooks, reference  # noqa: E402
from qlora.quant import triton as qt  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if not qt.available():
    pytest.skip("Triton kernels unavailable (no CUDA and TRITON_INTERPRET != 1)", allow_module_level=True)


QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality, except that any NaN matches any NaN (torch's bf16 NaN bits vary by path)."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ at {torch.nonzero(nan_a != nan_e)[:5].tolist()}"
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.uint8: torch.uint8}[actual.dtype]
    a, e = actual.view(bits)[~nan_a], expected.view(bits)[~nan_e]
    bad = torch.nonzero(a != e).flatten()
    assert bad.numel() == 0, (f"{bad.numel()} of {a.numel()} differ, first at {bad[:5].tolist()}: "
                              f"{actual[~nan_a][bad[:5]].tolist()} vs {expected[~nan_e][bad[:5]].tolist()}")


def _quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    bounds, order = codebooks.sorted_bounds(quant_type)
    return qt.quantize_4bit(_dev(x.reshape(-1)), blocksize, _dev(bounds), _dev(order))


def _check_quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    packed, absmax = _quantize(x, blocksize, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit_blocks(x, blocksize, quant_type)
    _assert_same(packed, ref_packed)
    _assert_same(absmax, ref_absmax)


def _dequantize(packed, absmax, code, blocksize, n, dtype, nested=None) -> torch.Tensor:
    out = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
    if nested is not None:
        nested = tuple(_dev(t) for t in nested[:3]) + (nested[3],)
    result = qt.dequantize_4bit(_dev(packed), _dev(absmax), _dev(code), blocksize, out, nested)
    assert result is out
    return out


def _nested(absmax: torch.Tensor):
    """Double-quantised scales: (codes, nested tuple for the kernel, fp32 scales the reference uses)."""
    codes, nested_absmax, offset = reference.double_quantize(absmax)
    dmap = codebooks.dynamic_map()
    scales = reference.double_dequantize(codes, nested_absmax, dmap, offset)
    return codes, (nested_absmax, dmap, offset, 256), scales


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, saturated to its finite range (3.4e38 would round to inf in bf16)."""
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype)


def _special_values(n: int, blocksize: int, generator: torch.Generator) -> torch.Tensor:
    """Blocks of assorted hard cases: zeros, subnormals, huge values, exact midpoints and mixes."""
    kinds = []
    nf4_mid, _ = codebooks.sorted_bounds("nf4")
    mids = torch.cat([b for b in (codebooks.sorted_bounds(q)[0] for q in QUANT_TYPES)])
    for k in range(-(-n // blocksize)):
        kind = k % 8
        if kind == 0:
            block = torch.zeros(blocksize)
        elif kind == 1:  # fp32 subnormals, and a block whose absmax is below the 1e-38 clamp
            block = torch.randn(blocksize, generator=generator) * 1e-40
        elif kind == 2:  # huge: 1 / absmax is subnormal
            block = torch.randn(blocksize, generator=generator).clamp(-1, 1) * 3.0e38
            block[k % blocksize] = -torch.finfo(torch.float32).max
        elif kind == 3:  # ties: absmax 1 (exact reciprocal), values exactly on the midpoints
            block = mids[torch.randint(0, mids.numel(), (blocksize,), generator=generator)]
            block = block * torch.where(torch.rand(blocksize, generator=generator) < 0.5, 1.0, -1.0)
            block[0] = 1.0
        elif kind == 4:  # ties with absmax 2**-3, and neighbours one ulp either side of a midpoint
            block = nf4_mid[torch.randint(0, 15, (blocksize,), generator=generator)]
            step = torch.randint(-1, 2, (blocksize,), generator=generator).float()
            block = torch.nextafter(block, block + step) * 0.125
            block[-1] = -0.125
        elif kind == 5:  # mixed magnitudes inside one block
            block = torch.randn(blocksize, generator=generator) * torch.logspace(-30, 30, blocksize)
        elif kind == 6:  # a single non-zero
            block = torch.zeros(blocksize)
            block[k % blocksize] = -3.0
        else:
            block = torch.randn(blocksize, generator=generator)
        kinds.append(block)
    return torch.cat(kinds)[:n].float()


# ------------------------------------------------------------------------------------ quantise


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_random_all_blocksizes_dtypes(quant_type):
    g = torch.Generator().manual_seed(1)
    for i, blocksize in enumerate(BLOCKSIZES):
        for dtype in DTYPES:
            # a full-block count, then odd counts with a partial last block
            for n in (2 * blocksize, 3 * blocksize + 1 + 2 * i, blocksize // 2 + 1):
                x = (torch.randn(n, generator=g) * 10 ** (i - 3)).to(dtype)
                _check_quantize(x, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
def test_quantize_special_values(quant_type, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for n in (8 * blocksize, 8 * blocksize - 3, 5 * blocksize + 5):  # the tail lands on each kind in turn
        x = _special_values(n, blocksize, g)
        _check_quantize(x, blocksize, quant_type)
        for dtype in (torch.bfloat16, torch.float16):  # subnormals (fp32 ones flush to 0), saturated maxima
            _check_quantize(_to(x, dtype), blocksize, quant_type)


def test_quantize_low_precision_subnormal_inputs():
    g = torch.Generator().manual_seed(3)
    for dtype, tiny in ((torch.bfloat16, 1e-39), (torch.float16, 3e-6)):
        x = (torch.randn(700, generator=g) * tiny).to(dtype)
        x[:64] = 0
        for blocksize in (32, 64, 128):
            _check_quantize(x, blocksize, "nf4")


def test_quantize_tiny_and_odd_sizes():
    for n in (1, 2, 3, 31, 33, 63, 65):
        x = torch.linspace(-2, 3, n)
        for blocksize in (2, 16, 32, 64):  # the kernels take any power of two up to 4096
            _check_quantize(x, blocksize, "fp4")


def test_quantize_many_programs(monkeypatch):
    g = torch.Generator().manual_seed(4)
    for tile in (qt.TILE_ELEMS, 256):  # the GPU tile, and one small enough for many programs
        monkeypatch.setattr(qt, "INTERPRET_TILE_ELEMS", tile)
        for blocksize, n in ((32, 5000), (64, 4096 * 3 + 70), (4096, 3 * 4096 - 1)):
            x = _to(_special_values(n, blocksize, g), torch.bfloat16 if blocksize == 64 else torch.float32)
            _check_quantize(x, blocksize, "nf4")


def test_quantize_empty():
    packed, absmax = _quantize(torch.empty(0), 64, "nf4")
    assert packed.numel() == 0 and absmax.numel() == 0


# ---------------------------------------------------------------------------------- dequantise


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_dequantize_roundtrip_all_blocksizes_dtypes(quant_type, nested):
    g = torch.Generator().manual_seed(5)
    code = codebooks.codebook(quant_type)
    for i, blocksize in enumerate(BLOCKSIZES):
        n = 2 * blocksize + 2 * i + 1 if i % 2 else 3 * blocksize  # odd counts with partial blocks too
        x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
        packed, absmax = reference.quantize_4bit_blocks(x, blocksize, quant_type)
        stored, nest, scales = _nested(absmax) if nested else (absmax, None, absmax)
        for dtype in DTYPES:
            expected = reference.dequantize_4bit_blocks(packed, scales, code, blocksize, n, dtype)
            _assert_same(_dequantize(packed, stored, code, blocksize, n, dtype, nest), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_random_bytes_and_scales(dtype):
    """Every nibble pair, scales from subnormal to huge (overflow to inf in fp16/bf16), inf and NaN."""
    g = torch.Generator().manual_seed(6)
    for blocksize, n in ((32, 32 * 40 + 7), (128, 128 * 9), (2048, 2048 + 2)):
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
        packed[:128] = torch.arange(128, dtype=torch.uint8) * 2 + 1
        n_blocks = -(-n // blocksize)
        absmax = torch.exp(torch.empty(n_blocks).uniform_(-95, 89, generator=g))  # 1e-41 .. 4e38
        absmax[: min(4, n_blocks)] = torch.tensor([0.0, float("inf"), float("nan"), 65504.0])[: min(4, n_blocks)]
        for quant_type in QUANT_TYPES:
            code = codebooks.codebook(quant_type)
            expected = reference.dequantize_4bit_blocks(packed, absmax, code, blocksize, n, dtype)
            _assert_same(_dequantize(packed, absmax, code, blocksize, n, dtype), expected)


def test_dequantize_output_rounding():
    """Round to nearest even at exact halfway points, subnormals, overflow, signs and NaN."""
    table = torch.tensor([
        1 + 2**-11, 1 + 3 * 2**-11,  # fp16 halfway cases: down to even, up to even
        1 + 2**-8, 1 + 3 * 2**-8,  # bf16 halfway cases
        -(2**-25), 3 * 2**-25,  # fp16 subnormal halfway cases (0 and 2**-23)
        2**-134, -3 * 2**-134,  # bf16 subnormal halfway cases
        65519.0, 65520.0,  # fp16: largest finite / overflow to inf
        3.4028235e38, -3.3961776e38,  # bf16: overflow to inf, and just below
        float("nan"), 1e-45, 1.0 + 2**-23, -0.0,
    ], dtype=torch.float32)
    assert table.numel() == 16
    packed = torch.arange(256, dtype=torch.uint8)
    for scale in (1.0, 0.5, 1.5):
        absmax = torch.full((8,), scale)
        for dtype in DTYPES:
            expected = reference.dequantize_4bit_blocks(packed, absmax, table, 64, 511, dtype)
            _assert_same(_dequantize(packed, absmax, table, 64, 511, dtype), expected)


def test_dequantize_nested_special_scales():
    """Double-quantised scales from absmax values of very different sizes, including zero blocks."""
    g = torch.Generator().manual_seed(7)
    for blocksize, n in ((32, 32 * 700 + 9), (64, 64 * 513)):  # > 256 blocks: several nested blocks
        x = _special_values(n, blocksize, g)
        x = torch.where(x.abs() > 1e30, x * 1e-30, x)  # keep absmax - mean finite
        packed, absmax = reference.quantize_4bit_blocks(x, blocksize, "nf4")
        stored, nest, scales = _nested(absmax)
        for dtype in DTYPES:
            expected = reference.dequantize_4bit_blocks(packed, scales, codebooks.codebook("nf4"), blocksize, n, dtype)
            _assert_same(_dequantize(packed, stored, codebooks.codebook("nf4"), blocksize, n, dtype, nest), expected)


def test_dequantize_many_programs(monkeypatch):
    g = torch.Generator().manual_seed(8)
    code = codebooks.codebook("nf4")
    for tile in (qt.TILE_ELEMS, 128):
        monkeypatch.setattr(qt, "INTERPRET_TILE_ELEMS", tile)
        for blocksize, n, nested in ((32, 9001, True), (64, 64 * 70, False), (4096, 2 * 4096 + 3, True)):
            packed, absmax = reference.quantize_4bit_blocks(torch.randn(n, generator=g), blocksize, "nf4")
            stored, nest, scales = _nested(absmax) if nested else (absmax, None, absmax)
            for dtype in (torch.bfloat16, torch.float16):
                expected = reference.dequantize_4bit_blocks(packed, scales, code, blocksize, n, dtype)
                _assert_same(_dequantize(packed, stored, code, blocksize, n, dtype, nest), expected)


def test_dequantize_into_2d_out_and_empty():
    packed, absmax = reference.quantize_4bit_blocks(torch.randn(6, 64), 64, "nf4")
    out = torch.empty(6, 64, dtype=torch.bfloat16, device=DEVICE)
    qt.dequantize_4bit(_dev(packed), _dev(absmax), _dev(codebooks.codebook("nf4")), 64, out)
    expected = reference.dequantize_4bit_blocks(packed, absmax, codebooks.codebook("nf4"), 64, 384, torch.bfloat16)
    _assert_same(out.reshape(-1), expected)
    empty = torch.empty(0, device=DEVICE)
    assert qt.dequantize_4bit(_dev(torch.empty(0, dtype=torch.uint8)), _dev(torch.empty(0)),
                              _dev(codebooks.codebook("nf4")), 64, empty) is empty


# ----------------------------------------------------------------------------------------- gemv


def _assert_gemv_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out (rows, n_out) in x.dtype against x.float() @ weight.T, weight the fp32 dequantised W."""
    dtype, n_in = x.dtype, x.shape[1]
    x, y = x.cpu().float(), out.cpu().float()
    expected = x @ weight.T
    # Tolerance. The kernel multiplies the same fp32 weights (code[q] * scale, not rounded to
    # x.dtype) by the same fp32 x; only the summation order differs from torch's fp32 matmul, and
    # each of the two fp32 sums is within gamma_K * sum|x||w| of the exact one (gamma_K = K u / (1 - K u),
    # u = 2**-24, a worst-case bound whatever the order, FMA or not). The kernel's result is then
    # rounded to nearest in x.dtype: at most half an ulp, i.e. u_out * |y| with the unit roundoff
    # u_out = 2**-24, 2**-8 or 2**-11 for fp32 / bf16 / fp16 (24, 8, 11 significant bits; the
    # results here are far from the subnormal range, where that relative bound would not hold).
    u = 2.0**-24
    gamma = n_in * u / (1 - n_in * u)
    magnitude = x.abs() @ weight.abs().T
    u_out = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tol = 2 * gamma * magnitude + u_out * (expected.abs() + gamma * magnitude)
    err = (y - expected).abs()
    assert torch.isfinite(y).all()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item()} (shape {tuple(y.shape)}, K={n_in}, {dtype})"


def _check_gemv(rows, n_out, n_in, blocksize, dtype, nested, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    packed, absmax = reference.quantize_4bit_blocks(w, blocksize, quant_type)
    stored, nest, scales = _nested(absmax) if nested else (absmax, None, absmax)
    code = codebooks.codebook(quant_type)
    weight = reference.dequantize_4bit_blocks(packed, scales, code, blocksize, n_out * n_in, torch.float32)
    weight = weight.view(n_out, n_in)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    out = torch.full((rows, n_out), float("nan"), dtype=dtype, device=DEVICE)
    if nest is not None:
        nest = tuple(_dev(t) for t in nest[:3]) + (nest[3],)
    result = qt.gemv_4bit(_dev(x), _dev(packed), _dev(stored), _dev(code), blocksize, n_out, n_in, out, nest)
    assert result is out
    _assert_gemv_close(out, x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
def test_gemv_aligned(dtype, nested):
    # K a multiple of the block: one scale per (feature, block) chunk
    for rows, n_out, n_in, blocksize in ((1, 70, 256, 64), (3, 33, 2048, 32), (8, 9, 4096, 4096), (2, 5, 1024, 512)):
        _check_gemv(rows, n_out, n_in, blocksize, dtype, nested, seed=rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_blocks_straddle_rows_and_odd_k(dtype):
    # even K not a multiple of the block (one scale per 2, 4 or 32 elements: the largest power of
    # two dividing K), then odd K (rows start mid-byte: one nibble and scale per element)
    for rows, n_out, n_in, blocksize, nested in ((1, 41, 300, 64, True), (4, 7, 96, 128, False),
                                                 (3, 11, 302, 64, True),
                                                 (2, 13, 129, 32, False), (5, 6, 77, 64, True),
                                                 (1, 3, 1, 32, False)):
        _check_gemv(rows, n_out, n_in, blocksize, dtype, nested, quant_type="fp4", seed=n_in)


def test_gemv_all_row_counts_and_more_than_eight():
    for rows in (1, 2, 5, 6, 7, 8, 11):
        _check_gemv(rows, 19, 160, 32, torch.float32, rows % 2 == 0, quant_type="int4", seed=rows)


def test_gemv_gpu_tiles(monkeypatch):
    monkeypatch.setattr(qt, "INTERPRET_GEMV_BLOCK_N", qt.GEMV_BLOCK_N)
    monkeypatch.setattr(qt, "INTERPRET_GEMV_BLOCK_K", qt.GEMV_BLOCK_K)
    for rows, n_out, n_in, blocksize, nested in ((1, 20, 2048 + 512, 64, True), (8, 10, 384, 256, False),
                                                 (3, 9, 302, 64, False), (1, 9, 131, 32, True)):
        _check_gemv(rows, n_out, n_in, blocksize, torch.bfloat16, nested, seed=n_in)


def test_gemv_x_not_pair_aligned():
    """x starting one element into its storage cannot be read as pairs: the per-element kernel runs."""
    g = torch.Generator().manual_seed(9)
    n_out, n_in, blocksize = 7, 64, 32
    packed, absmax = reference.quantize_4bit_blocks(torch.randn(n_out, n_in, generator=g), blocksize, "nf4")
    code = codebooks.codebook("nf4")
    weight = reference.dequantize_4bit_blocks(packed, absmax, code, blocksize, n_out * n_in, torch.float32)
    for dtype in DTYPES:
        x = _dev(torch.randn(1 + 2 * n_in, generator=g).to(dtype))[1:].view(2, n_in)
        out = torch.empty(2, n_out, dtype=dtype, device=DEVICE)
        qt.gemv_4bit(x, _dev(packed), _dev(absmax), _dev(code), blocksize, n_out, n_in, out)
        _assert_gemv_close(out, x, weight.view(n_out, n_in))


def test_gemv_degenerate_shapes():
    code = _dev(codebooks.codebook("nf4"))
    out = torch.full((2, 3), 5.0, device=DEVICE)
    qt.gemv_4bit(torch.empty(2, 0, device=DEVICE), _dev(torch.empty(0, dtype=torch.uint8)), _dev(torch.empty(0)),
                 code, 64, 3, 0, out)
    assert torch.equal(out.cpu(), torch.zeros(2, 3))


def test_available_and_argument_checks():
    assert qt.available()
    code = _dev(codebooks.codebook("nf4"))
    bounds, order = (_dev(t) for t in codebooks.sorted_bounds("nf4"))
    packed, absmax = (_dev(t) for t in reference.quantize_4bit_blocks(torch.randn(128), 64, "nf4"))
    out = torch.empty(128, device=DEVICE)
    x, u8 = torch.randn(64, device=DEVICE), absmax.to(torch.uint8)  # uint8 absmax only with nested
    bad_calls = [
        ("blocksize", lambda: qt.dequantize_4bit(packed, absmax, code, 48, out)),
        ("packed", lambda: qt.dequantize_4bit(packed[:-1], absmax, code, 64, out)),
        ("absmax", lambda: qt.dequantize_4bit(packed, u8, code, 64, out)),
        ("out", lambda: qt.dequantize_4bit(packed, absmax, code, 64, out.double())),
        ("nested", lambda: qt.dequantize_4bit(packed, u8, code, 64, out, nested=(absmax,))),
        ("x", lambda: qt.quantize_4bit(x.double(), 64, bounds, order)),
        ("contiguous", lambda: qt.quantize_4bit(x.view(8, 8).t(), 64, bounds, order)),
        ("order", lambda: qt.quantize_4bit(x, 64, bounds, order.long())),
        ("shape", lambda: qt.gemv_4bit(x.view(2, 32), packed, absmax, code, 64, 2, 64, out[:4].view(2, 2))),
        ("out", lambda: qt.gemv_4bit(x.view(1, 64), packed, absmax, code, 64, 2, 64, out[:2].half().view(1, 2))),
    ]
    for match, call in bad_calls:
        with pytest.raises(ValueError, match=match):
            call()


# ------------------------------------------------------------------------- through the public API


@pytest.fixture
def triton_backend(monkeypatch):
    """Route qlora.quantize_4bit / dequantize_4bit / matmul_4bit through the Triton kernels."""
    monkeypatch.setenv("QLORA_BACKEND", "triton")


@pytest.mark.parametrize("quant_type, blocksize, double_quant", [("nf4", 64, True), ("fp4", 128, False),
                                                                 ("int4", 4096, True)])
def test_public_api_on_triton_equals_reference(triton_backend, monkeypatch, quant_type, blocksize, double_quant):
    import qlora
    from qlora.quant import backends

    assert backends.select(torch.device(DEVICE)).name == "triton"
    g = torch.Generator().manual_seed(blocksize)
    w = _dev(torch.randn(37, 301, generator=g).to(torch.bfloat16))  # odd count, blocks straddle rows
    packed, state = qlora.quantize_4bit(w, quant_type, blocksize, double_quant)
    out = qlora.dequantize_4bit(packed, state)
    x = _dev(torch.randn(3, 301, generator=g).to(torch.bfloat16))
    y = qlora.matmul_4bit(x, packed, state)  # 3 rows: the Triton matvec
    monkeypatch.setenv("QLORA_BACKEND", "reference")
    packed_ref, state_ref = qlora.quantize_4bit(w, quant_type, blocksize, double_quant)
    _assert_same(packed, packed_ref)
    _assert_same(state.absmax, state_ref.absmax)
    if double_quant:
        _assert_same(state.state2.absmax, state_ref.state2.absmax)
    _assert_same(out, qlora.dequantize_4bit(packed_ref, state_ref))
    # The matvec decodes W in fp32 and accumulates in fp32: against that product, the error is the
    # bf16 rounding of the output (unit roundoff 2**-8) plus fp32 summation error.
    w32 = qlora.dequantize_4bit(packed_ref, state_ref, out=torch.empty(w.shape, device=w.device))
    expected = x.float() @ w32.T
    bound = 2**-8 * expected.abs() + 1e-5 * (x.float().abs() @ w32.abs().T)
    assert ((y.float() - expected).abs() <= bound).all()


def test_public_api_refuses_non_finite_input_on_triton(triton_backend):
    import qlora

    with pytest.raises(ValueError, match="NaN/Inf"):
        qlora.quantize_4bit(_dev(torch.tensor([1.0, float("nan")] * 32)))


def test_forcing_an_unknown_backend_is_a_clear_error(monkeypatch):
    from qlora.quant import backends

    monkeypatch.setenv("QLORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="QLORA_BACKEND='cuda-magic' is not one of"):
        backends.select(torch.device("cpu"))
