"""Linear4bit: forward/backward against F.linear on the dequantised weight, memory of the backward,
checkpointing, torch.compile, device moves, and state-dict round trips with bitsandbytes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.errors import UsageError
from qlora.nn import Linear4bit

# 5120 weights, 80 blocks of 64. in_features is a multiple of the block size on purpose: bitsandbytes
# 0.50.2's CPU dequantize_4bit (our oracle) returns wrong values from element 128 on when it is not
# (seen with (40, 96); our dequantisation matches the format there, see test_quant.py).
IN, OUT = 128, 40


def _linear(in_features: int = IN, out_features: int = OUT, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _layer(compute_dtype: torch.dtype = torch.float32, **kwargs) -> Linear4bit:
    return Linear4bit.from_linear(_linear(**kwargs), compute_dtype=compute_dtype)


def _saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while `fn()` runs."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


# ------------------------------------------------------------------------------ forward/backward
def test_fp32_forward_and_input_grad_are_bit_exact_with_dequantised_weight():
    layer = _layer(torch.float32)
    weight = layer.dequantize()
    x = torch.randn(3, 7, IN, requires_grad=True)  # 21 rows: the dequantise + matmul path
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 7, OUT)
    assert torch.equal(y, F.linear(x, weight, layer.bias))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ weight)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_odd_shape_with_a_padded_last_byte():
    layer = Linear4bit.from_linear(_linear(17, 33), blocksize=32, compute_dtype=torch.float32)
    assert layer.weight.shape == ((17 * 33 + 1) // 2, 1)
    x = torch.randn(10, 17, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.dequantize(), layer.bias))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones(10, 33) @ layer.dequantize())


def test_bf16_compute_matches_fp32_reference_within_bf16_tolerance():
    layer = _layer(torch.bfloat16)
    weight = layer.dequantize()  # fp32: the source nn.Linear was fp32
    x = torch.randn(32, IN, requires_grad=True)
    y = layer(x)  # fp32 input is cast to the compute dtype
    assert y.dtype == torch.bfloat16
    # Same ops in bf16: identical.
    assert torch.equal(y, F.linear(x.detach().bfloat16(), weight.bfloat16(), layer.bias))
    # Against fp32: bf16 rounds x, W and y (u = 2**-8 each), so 4u of |x| @ |W|.T bounds the error.
    reference = F.linear(x.detach(), weight, layer.bias.float())
    bound = 4 * 2**-8 * (x.detach().abs() @ weight.abs().T + layer.bias.float().abs())
    assert ((y.float() - reference).abs() <= bound).all()
    grad_out = torch.randn(32, OUT)
    y.backward(grad_out.bfloat16())
    assert x.grad.dtype == torch.float32  # autograd casts back to the input's dtype
    grad_bound = 4 * 2**-8 * (grad_out.abs() @ weight.abs())
    assert ((x.grad - grad_out @ weight).abs() <= grad_bound).all()


def test_small_batch_agrees_with_the_dequantised_reference():
    layer = _layer(torch.float32)
    x = torch.randn(2, IN)  # <= 8 rows: matmul_4bit's fused matvec (native CPU kernel when built)
    with torch.no_grad():
        y = layer(x)
    reference = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


def test_trainable_bias_gets_the_summed_output_gradient():
    layer = _layer(torch.float32)
    layer.bias.requires_grad_(True)
    y = layer(torch.randn(4, 5, IN))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)))
    assert layer.weight.grad is None


def test_backward_saves_only_the_packed_weight():
    layer = _layer(torch.bfloat16)
    x = torch.randn(16, IN, requires_grad=True)
    saved = _saved_tensors(lambda: layer(x).float().sum())
    # The only thing kept for the input gradient is the packed 4-bit weight (n/2 bytes); a
    # dequantised copy would be OUT*IN*2 bytes and would show up here.
    assert [t.data_ptr() for t in saved] == [layer.weight.data_ptr()]
    assert sum(t.numel() * t.element_size() for t in saved) == OUT * IN // 2


def test_non_reentrant_checkpointing_gives_the_same_gradients():
    layer = _layer(torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(12, IN)
    x_plain, x_ckpt = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x_plain).tanh().sum().backward()
    bias_grad = layer.bias.grad.clone()
    layer.bias.grad = None
    checkpoint(lambda t: layer(t).tanh(), x_ckpt, use_reentrant=False).sum().backward()
    assert torch.equal(x_ckpt.grad, x_plain.grad)
    assert torch.equal(layer.bias.grad, bias_grad)


def test_torch_compile_forward_and_backward():
    layer = _layer(torch.float32)
    compiled = torch.compile(layer, backend="eager")  # inductor needs a C++ toolchain; see below
    x = torch.randn(12, IN, requires_grad=True)
    y = compiled(x)
    assert torch.equal(y, layer(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(12, OUT) @ layer.dequantize())


@pytest.mark.slow
def test_torch_compile_inductor():
    layer = _layer(torch.float32)
    x = torch.randn(12, IN)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x))


# ---------------------------------------------------------------------- construction and export
def test_to_linear_is_the_exact_dequantised_weight():
    layer = _layer(torch.float32)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float32
    assert torch.equal(linear.weight, layer.dequantize())
    x = torch.randn(10, IN)
    assert torch.equal(linear(x), layer(x))
    assert torch.equal(layer.to_linear(torch.bfloat16).weight, layer.dequantize().bfloat16())


def test_constructor_builds_a_usable_layer_and_meta_shell():
    layer = Linear4bit(IN, OUT, quant_type="fp4", blocksize=128, double_quant=False)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (OUT * IN // 2, 1)
    assert layer.quant_state.quant_type == "fp4" and layer.quant_state.state2 is None
    assert layer(torch.randn(9, IN)).dtype == torch.bfloat16
    shell = Linear4bit(IN, OUT, device="meta")
    assert shell.weight.is_meta and shell.quant_state is None
    with pytest.raises(RuntimeError, match="empty shell"):
        shell(torch.randn(2, IN))


def test_from_quantized_wraps_codes_without_copying():
    source = _layer(torch.float32)
    layer = Linear4bit.from_quantized(source.weight.data, source.quant_state, source.bias.data,
                                      compute_dtype=torch.float32)
    assert layer.weight.data_ptr() == source.weight.data_ptr()
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    x = torch.randn(10, IN)
    assert torch.equal(layer(x), source(x))


def test_extra_repr_names_the_quantisation():
    text = repr(Linear4bit.from_linear(_linear(), quant_type="fp4", blocksize=32, double_quant=False))
    assert "quant_type=fp4" in text and "blocksize=32" in text and "double_quant=False" in text


def test_from_linear_rejects_a_non_linear():
    with pytest.raises(UsageError, match="expected a torch.nn.Linear, got Conv1d"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))


def test_to_moves_but_never_converts_packed_bytes():
    layer = Linear4bit.from_linear(_linear(), quant_storage=torch.bfloat16)
    packed = layer.weight.detach().clone()
    state = layer.quant_state
    layer.float()  # would turn bf16-viewed codes into garbage if applied to them
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    assert layer.quant_state is state and layer.bias.dtype == torch.float32
    layer.to("meta")
    assert layer.weight.is_meta and layer.quant_state.absmax.is_meta


# ------------------------------------------------------------------------------- state dicts
def test_state_dict_round_trips_into_a_meta_shell_via_safetensors(tmp_path):
    model = nn.ModuleList([_layer(torch.bfloat16, seed=1), _layer(torch.bfloat16, seed=2)])
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))  # two layers: their states must not share tensors
    shell = nn.ModuleList([Linear4bit(IN, OUT, device="meta"), Linear4bit(IN, OUT, device="meta")])
    shell.load_state_dict(load_file(str(path)))
    x = torch.randn(11, IN)
    for loaded, original in zip(shell, model):
        assert torch.equal(loaded(x), original(x))
        assert not loaded.weight.is_meta and not loaded.weight.requires_grad


def test_load_rejects_shape_mismatch_naming_key_and_shapes():
    small = Linear4bit(IN, OUT - 8, device="meta")
    with pytest.raises(RuntimeError, match=r"weight.*\(40, 128\).*\(32, 128\)"):
        small.load_state_dict(_layer().state_dict())
    no_bias = _layer(bias=False)
    no_bias_sd = no_bias.state_dict()
    no_bias_sd["bias"] = torch.zeros(OUT + 1)
    with pytest.raises(RuntimeError, match=r"bias.*\(41,\).*no bias"):
        no_bias.load_state_dict(no_bias_sd)


def test_load_rejects_an_unquantised_weight():
    with pytest.raises(RuntimeError, match="unquantised.*from_linear"):
        Linear4bit(IN, OUT, device="meta").load_state_dict(_linear().state_dict())


def test_load_reports_unexpected_and_missing_keys():
    state = _layer().state_dict()
    state["extra"] = torch.zeros(1)
    del state["bias"]
    result = Linear4bit(IN, OUT, device="meta").load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]


# ------------------------------------------------------------------ bitsandbytes interoperability
@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def _bnb_layer(bnb, linear: nn.Linear, quant_type: str, double_quant: bool):
    """bitsandbytes quantises on `.to(device)` (the oracle; our code never does this)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").train()  # train(): skip bnb's CPU inference re-packing


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_bnb_state_dict_loads_into_ours(bnb, quant_type, double_quant, tmp_path):
    reference = _bnb_layer(bnb, _linear(), quant_type, double_quant)
    path = tmp_path / "bnb.safetensors"
    save_file(reference.state_dict(), str(path))
    ours = Linear4bit(IN, OUT, device="meta", compute_dtype=torch.float32)
    ours.load_state_dict(load_file(str(path)))
    expected = bnb.functional.dequantize_4bit(reference.weight.data, reference.weight.quant_state)
    assert torch.equal(ours.dequantize(), expected)
    assert (ours.quant_type, ours.double_quant) == (quant_type, double_quant)
    x = torch.randn(16, IN)
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_our_state_dict_loads_into_bnb(bnb, quant_type, double_quant):
    ours = Linear4bit.from_linear(_linear(), quant_type=quant_type, double_quant=double_quant,
                                  compute_dtype=torch.float32)
    state = ours.state_dict()
    assert set(state) == set(_bnb_layer(bnb, _linear(), quant_type, double_quant).state_dict())
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    peer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type=quant_type, device="meta")
    peer.weight = bnb.nn.Params4bit.from_prequantized(data=state["weight"], quantized_stats=stats,
                                                      requires_grad=False, device="cpu", module=peer)
    peer.bias = nn.Parameter(state["bias"])
    x = torch.randn(16, IN)
    assert torch.equal(peer.train()(x), ours(x))
