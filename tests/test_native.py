"""The native CPU kernels (qlora.quant.native) against bitsandbytes 0.50.x, the oracle.

Quantise and dequantise must be bit-identical (torch.equal) for NF4 and FP4, every block size,
every float dtype, odd sizes and partial last blocks; the matrix-vector product must equal
x @ dequantize(W).T up to fp32 summation order. The portable scalar build (no AVX-512), the
`QLORA_NATIVE=0` switch and the missing-compiler fallback run in subprocesses, since the library
is loaded once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlora.quant import native

bnb_functional = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code, bounds, order) built as bitsandbytes' default backend builds them."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return code, bounds, order.to(torch.uint8)


def native_quantize(x: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, bounds, order = tables(quant_type)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    return native.quantize_4bit(x.reshape(-1), blocksize, bounds, order, packed, absmax)


def bnb_quantize(x: torch.Tensor, quant_type: str, blocksize: int):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=False)


def bnb_reference_dequantize(packed, absmax, quant_type, blocksize, n, dtype) -> torch.Tensor:
    """bitsandbytes' default-backend dequantisation, run eagerly (no torch.compile).

    This is bnb's definition (fp32 product, then `.to(dtype)`); its AVX-512 CPU kernel differs in
    two corners, so it is not used for those: it flushes subnormal bf16 results to zero, and for a
    2-D shape whose rows are not a whole number of blocks it reads the wrong scales.
    """
    code = bnb_functional.get_4bit_type(quant_type, device="cpu")
    compute = bnb_default_ops._dequantize_4bit_compute.__wrapped__
    return compute(packed.reshape(-1), absmax, code, blocksize, (n,), dtype)


def sizes(blocksize: int) -> list[int]:
    return [1, 33, 3 * blocksize, 3 * blocksize + 17, 4096 + 1]


@needs_native
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_and_dequantize_bit_exact_with_bnb(quant_type, blocksize, dtype):
    torch.manual_seed(blocksize)
    code, _, _ = tables(quant_type)
    for n in sizes(blocksize):
        x = (torch.randn(n) * 3).to(dtype)
        ref_packed, ref_state = bnb_quantize(x, quant_type, blocksize)
        packed, absmax = native_quantize(x, quant_type, blocksize)
        assert torch.equal(packed, ref_packed.reshape(-1)), (n, "packed")
        assert torch.equal(absmax, ref_state.absmax), (n, "absmax")
        for out_dtype in FLOATS:
            ref_state.dtype = out_dtype  # 1-D state: bnb's own kernel reads the right scales
            expected = bnb_functional.dequantize_4bit(ref_packed, ref_state).reshape(-1)
            out = native.dequantize_4bit(packed, absmax, code, blocksize, torch.empty(n, dtype=out_dtype))
            assert torch.equal(out, expected), (n, out_dtype)


def edge_inputs(n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(n)
    gauss = torch.randn(n, generator=g)
    return {
        "zeros": torch.zeros(n, dtype=dtype),
        "all_equal": torch.full((n,), -2.5, dtype=dtype),
        "subnormal": (gauss * info.tiny * 0.3).to(dtype),
        "near_tiny": (gauss * info.tiny * 30).to(dtype),
        "huge": (gauss.clamp(-1, 1) * info.max).to(dtype),
        "zeros_then_small": torch.cat([torch.zeros(n // 3), gauss[n // 3:] * 1e-30]).to(dtype),
    }


@needs_native
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_edge_values_bit_exact(quant_type, dtype):
    code, _, _ = tables(quant_type)
    for blocksize, n in [(32, 5), (64, 64), (64, 777), (256, 1000)]:
        for name, x in edge_inputs(n, dtype).items():
            ref_packed, ref_state = bnb_quantize(x, quant_type, blocksize)
            packed, absmax = native_quantize(x, quant_type, blocksize)
            assert torch.equal(packed, ref_packed.reshape(-1)), (name, blocksize, n)
            assert torch.equal(absmax, ref_state.absmax), (name, blocksize, n)
            for out_dtype in FLOATS:
                expected = bnb_reference_dequantize(packed, absmax, quant_type, blocksize, n, out_dtype)
                out = native.dequantize_4bit(packed, absmax, code, blocksize, torch.empty(n, dtype=out_dtype))
                assert torch.equal(out, expected), (name, blocksize, n, out_dtype)


def assert_gemv_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|y - x @ w.T| within the output rounding plus fp32 summation error (K * eps32 * |x||w|)."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    out_eps = torch.finfo(y.dtype).eps
    bound = out_eps * ref.abs() + x.shape[1] * torch.finfo(torch.float32).eps * scale + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "N, K, blocksize, m",
    [(64, 128, 64, 1), (33, 96, 64, 3), (17, 100, 32, 2), (9, 7, 32, 1), (20, 64, 4096, 9), (11, 46, 32, 8),
     (40, 4096, 4096, 1)],
)
def test_gemv_matches_dequantize_then_matmul(dtype, N, K, blocksize, m):
    torch.manual_seed(N * K + m)
    code, _, _ = tables("nf4")
    packed, absmax = native_quantize(torch.randn(N, K), "nf4", blocksize)
    # W in x.dtype, as a dequantise-then-matmul layer would hold it (flat blocks may cross rows).
    w = bnb_reference_dequantize(packed, absmax, "nf4", blocksize, N * K, dtype).reshape(N, K)
    x = torch.randn(m, K).to(dtype)
    y = native.gemv_4bit(x, packed, absmax, code, blocksize, N, K)
    assert y.shape == (m, N) and y.dtype == dtype
    assert_gemv_close(y, x, w)
    out = torch.full((m, N), float("nan"), dtype=dtype)
    assert native.gemv_4bit(x, packed, absmax, code, blocksize, N, K, out=out) is out
    assert torch.equal(out, y)


@needs_native
def test_bad_arguments_name_the_argument():
    code, bounds, order = tables("nf4")
    packed, absmax = native_quantize(torch.randn(128), "nf4", 64)
    with pytest.raises(ValueError, match="packed"):
        native.dequantize_4bit(packed[:-1], absmax, code, 64, torch.empty(128))
    with pytest.raises(ValueError, match="out"):
        native.dequantize_4bit(packed, absmax, code, 64, torch.empty(128, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        native.dequantize_4bit(packed, absmax, code, 63, torch.empty(128))
    with pytest.raises(ValueError, match="absmax_out"):
        native.quantize_4bit(torch.randn(128), 64, bounds, order, packed, torch.empty(3))
    with pytest.raises(ValueError, match="x must have shape"):
        native.gemv_4bit(torch.randn(1, 64), packed, absmax, code, 64, 1, 128)
    with pytest.raises(ValueError, match="contiguous"):
        native.gemv_4bit(torch.randn(128, 2).T[:1], packed, absmax, code, 64, 1, 128)


# ------------------------------------------------------------------------------- subprocesses

def run_python(code: str, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("QLORA_NATIVE", "CC", "QLORA_NATIVE_MARCH")}
    full_env.update(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PROBE = """
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from qlora.quant import native
        first, second = native.available(), native.available()
    print(json.dumps({"available": [first, second], "warnings": [str(w.message) for w in caught
                      if "native 4-bit" in str(w.message)]}))
"""


def test_switch_off_with_env_var(tmp_path):
    report = run_python(PROBE, QLORA_NATIVE="0", QLORA_HOME=str(tmp_path))
    assert report == {"available": [False, False], "warnings": []}
    assert not (tmp_path / "kernels").exists()


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    report = run_python(PROBE, CC=str(tmp_path / "no-such-cc"), QLORA_HOME=str(tmp_path))
    assert report["available"] == [False, False]
    assert len(report["warnings"]) == 1 and "compiler" in report["warnings"][0]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


@needs_native
@pytest.mark.parametrize(
    "march, avx512, needs",
    [("x86-64", 0, set()),  # the portable scalar code
     ("skylake-avx512", 1, {"avx512f", "avx512bw"})],  # AVX-512 without BF16: vector RNE fallback
)
def test_other_builds_match(tmp_path, march, avx512, needs):
    """Builds for other targets, each in a fresh cache, give the same bits as this machine's."""
    if os.uname().machine != "x86_64" or not needs <= cpu_flags():
        pytest.skip(f"-march={march} needs an x86-64 CPU with {sorted(needs)}")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    code, bounds, order = tables("nf4")
    x = torch.randn(7, 100).to(torch.bfloat16)  # 700 elements: a partial last block at 64
    save_file({"x": x, "code": code, "bounds": bounds, "order": order}, tmp_path / "in.safetensors")
    report = run_python(f"""
        import json, torch
        from safetensors.torch import load_file
        from qlora.quant import native
        t = load_file({str(tmp_path / "in.safetensors")!r})
        packed = torch.empty(350, dtype=torch.uint8)
        absmax = torch.empty(11)
        native.quantize_4bit(t["x"].reshape(-1), 64, t["bounds"], t["order"], packed, absmax)
        out = native.dequantize_4bit(packed, absmax, t["code"], 64, torch.empty(700, dtype=torch.bfloat16))
        y = native.gemv_4bit(t["x"][:2].contiguous(), packed, absmax, t["code"], 64, 7, 100)
        print(json.dumps({{"avx512": native._library().qn_has_avx512(),
                          "packed": packed.tolist(), "absmax": absmax.tolist(),
                          "out": out.float().tolist(), "y": y.float().tolist(),
                          "files": sorted(p.name for p in native.cache_dir().iterdir())}}))
    """, QLORA_NATIVE_MARCH=march, QLORA_HOME=str(tmp_path / "home"))
    assert report["avx512"] == avx512
    assert len(report["files"]) == 1 and report["files"][0].endswith(".so")  # no temp file left
    packed, absmax = native_quantize(x, "nf4", 64)
    out = native.dequantize_4bit(packed, absmax, code, 64, torch.empty(700, dtype=torch.bfloat16))
    assert report["packed"] == packed.tolist() and report["absmax"] == absmax.tolist()
    assert report["out"] == out.float().tolist()
    y = native.gemv_4bit(x[:2].contiguous(), packed, absmax, code, 64, 7, 100)
    torch.testing.assert_close(torch.tensor(report["y"]), y.float(), rtol=2**-7, atol=1e-3)


@needs_native
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 65536 + 3])
def test_double_quant_scales_bit_exact_with_bnb(n):
    torch.manual_seed(n)
    x = torch.randn(n * 64) * torch.rand(n * 64) * 10  # n blocks of 64 with varied scales
    _, state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    nested = state.state2
    expected = bnb_functional.dequantize_blockwise(state.absmax, nested) + state.offset
    out = native.dequantize_8bit(state.absmax, nested.code, nested.absmax, nested.blocksize,
                                 float(state.offset), torch.empty(n))
    assert torch.equal(out, expected)


@needs_native
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_counts_non_finite_values(dtype):
    x = torch.randn(1000).to(dtype)
    x[[3, 500, 999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    with pytest.raises(ValueError, match="3 NaN/Inf"):
        native_quantize(x, "nf4", 64)
    x[[3, 500, 999]] = torch.finfo(dtype).max  # the largest finite value is fine
    native_quantize(x, "nf4", 64)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_large_tensors_bit_exact_on_any_thread_count(threads):
    """Sizes above the kernels' parallel threshold (32768 elements), split across threads."""
    n, blocksize = 200_003, 64
    torch.manual_seed(threads)
    x = torch.randn(n).to(torch.bfloat16)
    code, _, _ = tables("nf4")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed, absmax = native_quantize(x, "nf4", blocksize)
        out = native.dequantize_4bit(packed, absmax, code, blocksize, torch.empty(n, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(previous)
    ref_packed, ref_state = bnb_quantize(x, "nf4", blocksize)
    assert torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(absmax, ref_state.absmax)
    assert torch.equal(out, bnb_functional.dequantize_4bit(ref_packed, ref_state).reshape(-1))
