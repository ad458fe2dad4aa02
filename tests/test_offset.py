"""Double quantisation's stored offset is the same bits on every backend and at every thread count.

The offset (the mean of the block scales) enters the stored bytes: it is saved, and the nested codes
quantise `absmax - offset`. torch's fp32 `mean()` lets the reduction kernel choose the summation
order, so it changes with the thread count on CPU (and again on CUDA); `fixed_order_mean` fixes the
order (qlora/quant/reference.py). The inputs here are chosen so that the fp32 orders differ: the
first test proves that for them, then the others show that ours does not move.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

import qlora
from qlora.quant import backends, reference

# Measured with torch 2.13 on CPU: 40,000 wide-range scales (seed 0) have fp32 means that differ
# between 1, 2 and 8 threads (torch splits a reduction across threads above 32,768 elements); 6 of
# 20 seeds differ at this size, 10 of 20 at 65,536.
N_BLOCKS, BLOCKSIZE = 40_000, 32
THREADS = (1, 2, 8)


def wide_scales(n: int = N_BLOCKS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).abs() * torch.exp(torch.randn(n, generator=g) * 2)


def weight_with_scales(scales: torch.Tensor) -> torch.Tensor:
    """An fp32 weight whose blocks of 32 have exactly these absmax values."""
    w = torch.zeros(scales.numel(), BLOCKSIZE)
    w[:, 0] = scales
    w[:, 1] = -scales / 3
    return w.reshape(-1)


@contextmanager
def threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_fp32_mean_of_these_scales_depends_on_the_thread_count():
    scales = wide_scales()
    means = set()
    for n in THREADS:
        with threads(n):
            means.add(scales.mean().item())
    assert len(means) > 1, "the input no longer discriminates: pick another seed"


def test_fixed_order_mean_is_the_float64_mean_rounded_once():
    for seed in range(5):
        scales = wide_scales(seed=seed)
        expected = torch.tensor(scales.double().sum().item() / scales.numel(), dtype=torch.float64).float()
        got = reference.fixed_order_mean(scales)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert abs(got.item() - expected.item()) <= torch.finfo(torch.float32).eps * abs(expected.item()) / 2
        for n in THREADS:
            with threads(n):
                assert torch.equal(reference.fixed_order_mean(scales), got)


def test_fixed_order_mean_of_odd_sizes_and_huge_values():
    for n in (1, 2, 3, 7, 255, 1001):
        x = torch.arange(1, n + 1, dtype=torch.float32)
        assert reference.fixed_order_mean(x).item() == (n + 1) / 2
    huge = torch.full((1000,), 3e38)
    assert reference.fixed_order_mean(huge).item() == pytest.approx(3e38, rel=1e-7)


def _backends() -> list[str]:
    names = ["reference"]
    if backends._native() is not None:
        names.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" and backends._triton() is not None:
        names.append("triton")
    return names


def test_stored_bytes_equal_on_every_backend_and_thread_count(monkeypatch):
    pytest.importorskip("triton")
    """The reference, native and (interpreted) Triton paths at 1, 2 and 8 threads: one offset, one
    set of nested codes and scales, one set of 4-bit bytes."""
    w = weight_with_scales(wide_scales())
    seen = {}
    for name in _backends():
        monkeypatch.setenv("QLORA_BACKEND", name)
        for n in THREADS:
            with threads(n):
                packed, state = qlora.quantize_4bit(w, blocksize=BLOCKSIZE, double_quant=True)
            seen[(name, n)] = (packed, state.absmax, state.state2.absmax, state.offset)
    first = next(iter(seen.values()))
    for key, tensors in seen.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, first)), key
    assert torch.equal(first[3], reference.fixed_order_mean(wide_scales()))
