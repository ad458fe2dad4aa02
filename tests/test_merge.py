"""Merging as a pure function over state dicts equals merging a loaded model, bit for bit."""

from __future__ import annotations

import pytest
import torch

from qlora.adapters.merge import dequantized_state_dict, merge_lora, merge_state_dict
from qlora.adapters.peft_format import adapter_state_dict
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.quant.format import QuantFormat
from tiny_models import randomise_lora_b, save_tiny

SPEC = LoraSpec(r=4, alpha=8, targets=("q_proj", "down_proj"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.mark.parametrize("quant", [None, QuantFormat()], ids=["16-bit", "nf4"])
def test_state_dict_merge_equals_model_merge(folder, quant):
    model = load_model(folder, quant=quant)
    base = {k: v.clone() for k, v in model.state_dict().items()}  # bitsandbytes layout when 4-bit
    apply_lora(model, SPEC)
    randomise_lora_b(model)
    adapter = adapter_state_dict(model)
    merged_model = merge_lora(model, torch.bfloat16).state_dict()
    merged = merge_state_dict(base, adapter, SPEC, torch.bfloat16)
    assert merged.keys() == merged_model.keys()
    assert all(torch.equal(merged[k], merged_model[k]) for k in merged)
    changed = {k for k in merged if not torch.equal(merged[k], dequantized_state_dict(base)[k].to(merged[k].dtype))}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_state_dict_merge_refuses_a_misfit(folder):
    base = load_model(folder, quant=None).state_dict()
    adapter = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(UsageError, match=r"q_proj.weight.*\(64, 32\).*\(64, 64\)"):
        merge_state_dict(base, adapter, SPEC)
