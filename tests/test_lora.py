"""LoRALinear: step-0 equality, scaling, gradients, dtypes, merge/unmerge/disable and the merge
guarantee stated in qlora/nn/lora.py, for nn.Linear and Linear4bit bases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlora.errors import UsageError
from qlora.nn import Linear4bit, LoRALinear

IN, OUT, R = 128, 48, 8
U_BF16 = 2**-8  # bf16 unit roundoff (8 significant bits, round to nearest)


def _base(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT)
    if kind == "fp32":
        return linear
    if kind == "bf16":
        return linear.to(torch.bfloat16)
    return Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)


def _trained(layer: LoRALinear, seed: int = 1) -> LoRALinear:
    """Give B a non-zero value, as after training, so the adapter changes the output noticeably."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(0.05 * torch.randn(OUT, layer.r))
    return layer


def _merge_bound(layer: LoRALinear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The documented bound: 4u * (|x| @ |W|.T + scaling * |x| @ |A|.T @ |B|.T)."""
    a = layer.lora_A.weight.float().abs()
    b = layer.lora_B.weight.float().abs()
    magnitude = x.abs() @ weight.float().abs().T + layer.scaling * (x.abs() @ a.T) @ b.T
    return 4 * U_BF16 * magnitude


@pytest.mark.parametrize("kind", ["fp32", "bf16", "4bit"])
def test_step_zero_equals_the_base(kind):
    base = _base(kind)
    layer = LoRALinear(base, r=R, alpha=16)
    x = torch.randn(5, 12, IN, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0


def test_lora_A_init_is_kaiming_uniform_like_peft():
    layer = LoRALinear(_base("fp32"), r=R, alpha=16)
    bound = 1 / math.sqrt(IN)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2/6), bound gain*sqrt(3/fan_in)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.9 * bound  # 1024 draws fill the interval


@pytest.mark.parametrize("use_rslora,expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling_and_forward(use_rslora, expected):
    base = _base("fp32")
    layer = _trained(LoRALinear(base, r=16, alpha=32, use_rslora=use_rslora, dtype=torch.float32))
    assert layer.scaling == expected
    x = torch.randn(6, IN)
    update = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * expected
    torch.testing.assert_close(layer(x), base(x) + update, rtol=1e-5, atol=1e-5)


def test_adapters_default_to_bf16_and_output_keeps_the_base_dtype():
    layer = LoRALinear(_base("fp32"), r=R, alpha=16)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, IN)).dtype == torch.float32


@pytest.mark.parametrize("kind", ["fp32", "4bit"])
def test_only_the_adapter_gets_gradients(kind):
    layer = _trained(LoRALinear(_base(kind), r=R, alpha=16))
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    assert grads["lora_A.weight"] is not None and grads["lora_B.weight"] is not None
    assert grads["lora_A.weight"].dtype == torch.bfloat16
    assert all(grads[name] is None for name in grads if name.startswith("base."))
    assert x.grad is not None
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_checkpointed_4bit_lora_gives_the_same_adapter_gradients():
    from torch.utils.checkpoint import checkpoint

    layer = _trained(LoRALinear(_base("4bit"), r=R, alpha=16))
    x = torch.randn(12, IN)
    layer(x).float().square().sum().backward()
    plain = [layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
    layer.zero_grad()
    checkpoint(layer, x, use_reentrant=False).float().square().sum().backward()
    assert torch.equal(layer.lora_A.weight.grad, plain[0])
    assert torch.equal(layer.lora_B.weight.grad, plain[1])


def test_peft_parameter_names():
    names = {name for name, _ in LoRALinear(_base("4bit"), r=R, alpha=16).named_parameters()}
    assert names == {"base.weight", "base.bias", "lora_A.weight", "lora_B.weight"}


def test_disable_and_enable():
    base = _base("fp32")
    layer = _trained(LoRALinear(base, r=R, alpha=16))
    x = torch.randn(4, IN)
    adapted = layer(x)
    layer.disable()
    assert layer.disabled and torch.equal(layer(x), base(x))
    layer.enable()
    assert torch.equal(layer(x), adapted) and not torch.equal(adapted, base(x))


def test_dropout_only_touches_the_adapter_and_is_off_in_eval():
    base = _base("fp32")
    layer = _trained(LoRALinear(base, r=R, alpha=16, dropout=0.5))
    plain = LoRALinear(base, r=R, alpha=16)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, IN)
    assert not torch.equal(layer.train()(x), plain(x))
    assert torch.equal(layer.eval()(x), plain(x))


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_merge_unmerge_follow_the_documented_bound(kind):
    layer = _trained(LoRALinear(_base(kind), r=R, alpha=16))
    original = layer.base.weight.detach().clone()
    x = torch.randn(16, IN).to(original.dtype)
    bound = _merge_bound(layer, original, x.float())
    unmerged = layer(x).float()
    layer.merge()
    assert layer.merged
    merged = layer(x).float()
    assert ((merged - unmerged).abs() <= bound).all()
    # The update exceeds the bound, so a missing or doubled merge would fail the check above.
    assert ((x.float() @ layer.delta_weight().T).abs() > bound).any()
    layer.unmerge()
    assert not layer.merged
    # W + d - d is W up to one rounding of W + d and one of the result: 2u of |W| + |d|.
    restored_error = (layer.base.weight.float() - original.float()).abs()
    assert (restored_error <= 2 * U_BF16 * (original.float().abs() + layer.delta_weight().abs())).all()
    assert ((layer(x).float() - unmerged).abs() <= bound).all()


def test_merge_state_errors():
    layer = LoRALinear(_base("fp32"), r=R, alpha=16)
    with pytest.raises(UsageError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(UsageError, match="already merged"):
        layer.merge()
    with pytest.raises(UsageError, match="unmerge"):
        layer.disable()


def test_merge_into_4bit_refuses_and_points_to_merged_linear():
    layer = LoRALinear(_base("4bit"), r=R, alpha=16)
    packed = layer.base.weight.detach().clone()
    with pytest.raises(UsageError, match="merged_linear"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, packed)


def test_merged_linear_from_4bit_is_exact_and_follows_the_bound():
    layer = _trained(LoRALinear(_base("4bit"), r=R, alpha=16))
    exact = layer.merged_linear(torch.float32)
    dequantised = layer.base.dequantize().float()
    assert torch.equal(exact.weight, dequantised + layer.delta_weight())
    assert torch.equal(exact.bias, layer.base.bias.float())
    export = layer.merged_linear()  # default: the 4-bit weight's source dtype (fp32 here)
    assert isinstance(export, nn.Linear) and export.weight.dtype == torch.float32
    x = torch.randn(16, IN)
    merged_bf16 = layer.merged_linear(torch.bfloat16)(x.bfloat16()).float()
    bound = _merge_bound(layer, dequantised, x)
    assert ((merged_bf16 - layer(x).float()).abs() <= bound).all()
    assert ((x @ layer.delta_weight().T).abs() > bound).any()  # the check can fail


def test_merged_linear_of_a_linear_base_does_not_mutate_it_and_respects_merge_state():
    layer = _trained(LoRALinear(_base("fp32"), r=R, alpha=16))
    before = layer.base.weight.detach().clone()
    export = layer.merged_linear()
    assert torch.equal(layer.base.weight, before)
    layer.merge()
    assert torch.equal(layer.merged_linear().weight, layer.base.weight)  # not added twice
    torch.testing.assert_close(export.weight, layer.base.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0, alpha=16), "r=0"),
        (dict(r=2.5, alpha=16), "r=2.5"),
        (dict(r=8, alpha=0), "alpha=0"),
        (dict(r=8, alpha=16, dropout=1.0), "dropout=1.0"),
        (dict(r=8, alpha=16, dropout=-0.1), "dropout=-0.1"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LoRALinear(_base("fp32"), **kwargs)


def test_base_must_be_linear_like():
    with pytest.raises(UsageError, match="ReLU is not linear-like"):
        LoRALinear(nn.ReLU(), r=8, alpha=16)
