"""The reference kernels and layers on every available device, against the CPU results.

On CUDA the pure-PyTorch reference path runs (the native kernels are CPU-only); it must produce
the same bytes and values as the CPU. Without a GPU the CUDA cases are skipped and the CPU twin
(reference path on CPU vs native path on CPU) still runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from qlora.nn import Linear4bit, LoRALinear
from qlora.quant import dequantize_4bit, quantize_4bit

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _on_reference_cpu(fn):
    """Run fn with the native CPU kernels switched off (the pure-PyTorch reference)."""
    saved = os.environ.get("QLORA_BACKEND")
    os.environ["QLORA_BACKEND"] = "reference"
    try:
        return fn()
    finally:
        os.environ.pop("QLORA_BACKEND")
        if saved is not None:
            os.environ["QLORA_BACKEND"] = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantise_dequantise_match_cpu(device, quant_type):
    x = torch.randn(96, 200, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(x.to(device), quant_type, 64, True)
    ref_packed, ref_state = _on_reference_cpu(lambda: quantize_4bit(x, quant_type, 64, True))
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(state.absmax.cpu(), ref_state.absmax)
    assert torch.equal(dequantize_4bit(packed, state).cpu(), _on_reference_cpu(lambda: dequantize_4bit(ref_packed, ref_state)))


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_layer_forward_backward_match_cpu(device):
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64, bias=True)
    layer_cpu = LoRALinear(Linear4bit.from_linear(base, compute_dtype=torch.float32), 8, 16, dtype=torch.float32)
    torch.nn.init.normal_(layer_cpu.lora_B.weight, std=0.1)
    layer = LoRALinear(Linear4bit.from_linear(base.to(device), compute_dtype=torch.float32), 8, 16,
                       dtype=torch.float32).to(device)
    layer.lora_A.weight.data.copy_(layer_cpu.lora_A.weight.data)
    layer.lora_B.weight.data.copy_(layer_cpu.lora_B.weight.data)
    x = torch.randn(4, 128)
    x_dev = x.clone().to(device).requires_grad_()
    x_cpu = x.clone().requires_grad_()
    y, y_cpu = layer(x_dev), layer_cpu(x_cpu)
    y.square().sum().backward()
    y_cpu.square().sum().backward()
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_dev.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.weight.grad.cpu(), layer_cpu.lora_B.weight.grad, rtol=1e-4, atol=1e-4)
