"""DoRA (qlora/nn/dora.py): the layer's maths, merging, PEFT's format, logits and gradients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from qlora.adapters.merge import dequantized_state_dict, merge_lora, merge_state_dict
from qlora.adapters.peft_format import adapter_state_dict, load_adapter, save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.nn import Linear4bit
from qlora.nn.adapter import Role
from qlora.nn.dora import DoRALinear
from qlora.quant.format import QuantFormat
from test_adapter import _offline, base  # noqa: F401  (fixtures: offline hub, a tiny llama folder)
from test_train import home  # noqa: F401  (fixture: a private QLORA_HOME)
from tiny_models import randomise_lora_b, tokens

SPEC = LoraSpec(r=4, alpha=8, use_dora=True)


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Random B (std 0.05) and magnitudes m * U(0.8, 1.2), so both parts of DoRA matter."""
    randomise_lora_b(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_magnitude_vector"):
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))


def layer(quantised: bool = False, dtype=torch.float32) -> DoRALinear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True, dtype=torch.float32)
    if quantised:
        linear = Linear4bit.from_linear(linear.to(torch.bfloat16), compute_dtype=torch.bfloat16)
    dora = DoRALinear(linear, r=4, alpha=8, dtype=dtype)
    randomise(dora)
    return dora


def explicit(dora: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's definition: x @ W'.T + bias with W' = m / ||W + s B A||_row * (W + s B A)."""
    w = dora.base_weight().double()
    adapted = w + dora.scaling * dora.lora_B.weight.double() @ dora.lora_A.weight.double()
    merged = dora.lora_magnitude_vector.double()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    return x.double() @ merged.T + dora.base.bias.double()


def test_fresh_layer_equals_its_base_bit_for_bit():
    linear = nn.Linear(64, 48)
    dora = DoRALinear(linear, r=4, alpha=8)
    x = torch.randn(5, 64)
    assert torch.equal(dora(x), linear(x))
    assert torch.equal(dora.lora_magnitude_vector, linear.weight.detach().norm(dim=1))
    roles = {n: r for n, (_, r) in dora.trainable_parameters().items()}
    assert roles == {"lora_A.weight": Role.A, "lora_B.weight": Role.B, "lora_magnitude_vector": Role.MAGNITUDE}


def test_forward_is_the_decomposed_weight():
    dora = layer()
    x = torch.randn(7, 64)
    ours = dora(x).double()
    torch.testing.assert_close(ours, explicit(dora, x), rtol=1e-5, atol=1e-5)
    assert (ours - (x @ dora.base.weight.T + dora.base.bias).double()).abs().max() > 0.05  # DoRA matters


def test_4bit_base_uses_the_dequantised_weight():
    dora = layer(quantised=True, dtype=torch.float32)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    ours = dora(x).double()
    rel = ((ours - explicit(dora, x)).norm() / ours.norm()).item()
    assert rel < 1e-2  # bf16 activations (the 4-bit base computes in bf16): a few ulps


def test_merge_unmerge_and_merged_linear():
    dora = layer()
    x = torch.randn(7, 64)
    before, weight = dora(x), dora.base.weight.detach().clone()
    merged = dora.merged_linear()
    dora.merge()
    torch.testing.assert_close(dora(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(dora.base.weight, merged.weight) and torch.equal(merged(x), dora(x))
    dora.unmerge()
    torch.testing.assert_close(dora.base.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dora(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dora.delta_weight() + weight, merged.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", [None, QuantFormat()], ids=["16-bit", "nf4"])
def test_state_dict_merge_equals_model_merge(base, quant):
    model = load_model(base, quant=quant)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, SPEC)
    randomise(model)
    merged = merge_state_dict(plain, adapter_state_dict(model), SPEC, torch.bfloat16)
    merged_model = merge_lora(model, torch.bfloat16).state_dict()
    assert merged.keys() == merged_model.keys()
    assert all(torch.equal(merged[k], merged_model[k]) for k in merged)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                           dequantized_state_dict(plain)["model.layers.0.mlp.up_proj.weight"].bfloat16())


def test_files_follow_peft_and_reload(base, tmp_path):
    ours = load_model(base, quant=QuantFormat())
    apply_lora(ours, SPEC)
    randomise(ours)
    save_adapter(ours, tmp_path / "a", SPEC, str(base))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = set(adapter_state_dict(ours))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys and len(keys) == 3 * 14
    again = load_model(base, quant=QuantFormat())
    load_adapter(again, tmp_path / "a")
    assert all(isinstance(m, DoRALinear) for m in again.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        assert torch.equal(again(tokens()).logits, ours(tokens()).logits)


def _assert_same(theirs, ours, before):
    """As tests/test_adapter.py: equal up to bf16 rounding (<3%), and the adapters visibly matter."""
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(theirs, ours) < 0.03 and rel(ours, before) > 5 * rel(theirs, ours)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits.float()


def test_peft_reads_ours_on_16bit_base(base, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = load_model(base, quant=None)
    apply_lora(ours, SPEC)
    randomise(ours)
    save_adapter(ours, tmp_path / "a", SPEC, str(base))
    plain = AutoModelForCausalLM.from_pretrained(base)
    before = _logits(plain)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a")
    _assert_same(_logits(theirs), _logits(ours), before)


def test_peft_reads_ours_on_4bit_base(base, tmp_path):
    """Our QDoRA against PEFT's DoRA on a 16-bit model holding our exactly dequantised 4-bit weights.

    Not against PEFT on a bitsandbytes 4-bit base: with peft 0.21.2 and bitsandbytes 0.50.2 on CPU,
    a freshly initialised PEFT DoRA layer (B = 0) on a bnb `Linear4bit` does not equal its base
    (max |difference| 0.89 on this model's q_proj, where the DoRA factor m / ||W|| is 1 +- 0.003);
    its forward re-dequantises and re-assigns the bnb weight (`dequantize_module_weight`). The
    bytes themselves equal bitsandbytes' (tests/test_quant.py), so this checks the same maths.
    """
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = load_model(base, quant=QuantFormat())
    apply_lora(ours, SPEC)
    randomise(ours)
    save_adapter(ours, tmp_path / "a", SPEC, str(base))
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    with torch.no_grad():
        for fqn, module in ours.named_modules():
            if isinstance(module, DoRALinear):
                plain.get_submodule(fqn).weight.copy_(module.base_weight())
    before = _logits(plain)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a")
    _assert_same(_logits(theirs), _logits(ours), before)


def test_dora_gradients_equal_peft(base, tmp_path):
    """fp32 base and adapters: the loss and every A, B and magnitude gradient equal PEFT's."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(r=8, alpha=16, dtype="fp32", use_dora=True)
    ours = load_model(base, quant=None, dtype=torch.float32)
    apply_lora(ours, spec)
    randomise(ours)
    save_adapter(ours, tmp_path / "a", spec, str(base))
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a", is_trainable=True)
    ids = tokens(2, 12)
    loss_ours, loss_theirs = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peers = {n.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peers.keys() and len(mine) == 3 * 7 * 2  # A, B, m; 7 projections; 2 layers
    for name in mine:
        torch.testing.assert_close(mine[name], peers[name], rtol=1e-4, atol=1e-6)


def test_bad_use_dora_exits_2(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_smoke.yaml"
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), f"output.dir={tmp_path / 'x'}",
                          "lora.use_dora=maybe"], capture_output=True, text=True)
    assert out.returncode == 2 and "lora.use_dora" in out.stderr, out.stderr


def test_reset_magnitude_keeps_the_lora_start():
    """After LoftQ / PiSSA set A and B, m = ||W + s B A||_row: the layer computes base + s B A x."""
    dora = layer()
    with torch.no_grad():
        dora.lora_magnitude_vector.fill_(1.0)
    dora.reset_magnitude()
    x = torch.randn(7, 64)
    lora = dora.base(x) + dora.scaling * x @ dora.lora_A.weight.T @ dora.lora_B.weight.T
    torch.testing.assert_close(dora(x), lora, rtol=1e-5, atol=1e-5)


def test_dora_run_through_eval_and_merge(home, tmp_path):  # noqa: F811
    """A tiny QDoRA run: `qlora eval` (one DoRA adapter, not AdapterSet) reproduces its final eval;
    the merged bf16 model is within the rounding of its weights; AdapterSet refuses DoRA."""
    from qlora.adapters.multi import AdapterSet
    from test_train import TINY, run_cli

    out = tmp_path / "dora"
    result = run_cli("train", str(TINY), f"output.dir={out}", "lora.use_dora=true", "train.save_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())["eval_after"]["eval_loss"]
    measured = run_cli("eval", str(out), "--json", str(tmp_path / "e.json"))
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["eval_loss"] == pytest.approx(after, rel=1e-6)
    assert run_cli("merge", str(out / "adapter"), str(tmp_path / "m")).returncode == 0
    merged = run_cli("eval", str(tmp_path / "m"), "quant.enabled=false", "--json", str(tmp_path / "m.json"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["eval_loss"] == pytest.approx(after, rel=2e-2)
    with pytest.raises(UsageError, match="DoRA adapter"):
        AdapterSet(load_model(TINY_MODEL, quant=QuantFormat())).load_adapter(out / "adapter", "d")


TINY_MODEL = "tiny-llama"


def test_combine_refuses_dora(base, tmp_path):
    from qlora.adapters.combine import read_adapter

    model = load_model(base, quant=None)
    apply_lora(model, SPEC)
    save_adapter(model, tmp_path / "a", SPEC, str(base))
    with pytest.raises(UsageError, match="DoRA adapter"):
        read_adapter(tmp_path / "a")
