"""`qlora quantize` folders load in transformers+bitsandbytes; `qlora merge` equals the unmerged model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.quant.format import QuantFormat
from qlora.cli import main
from qlora.hf.load import load_model
from qlora.adapters.surgery import apply_lora
from qlora.nn import Linear4bit
from tiny_models import randomise_lora_b, save_tiny, tokens


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "gpt2"])
def test_quantize_folder_loads_in_transformers(family, tmp_path):
    src = save_tiny(family, tmp_path / "src")
    assert main(["quantize", str(src), str(tmp_path / "q4")]) == 0
    config = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    ours = load_model(src)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    # Bit-identical 4-bit weights: bitsandbytes' dequantisation of the exported bytes equals ours.
    import bitsandbytes.functional as bnbf

    for fqn, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            p = theirs.get_submodule(fqn).weight
            assert torch.equal(bnbf.dequantize_4bit(p.data, p.quant_state), m.dequantize()), fqn
    # Same weights; bitsandbytes' CPU matmul rounds its bf16 products its own way (measured
    # relative difference of the logits about 1%, as in test_adapter.py).
    assert rel(logits(theirs), logits(ours)) < 0.03
    # And our loader reads the folder back without re-quantising: identical model.
    assert torch.equal(logits(load_model(tmp_path / "q4")), logits(ours))


def test_quantize_output_rules(tmp_path, capsys):
    src = save_tiny("llama", tmp_path / "src")
    (tmp_path / "out").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
    assert main(["quantize", str(src), str(tmp_path / "out"), "--overwrite", "--quant-type", "fp4"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["quantize", str(tmp_path / "bin"), str(tmp_path / "o2")]) == 2
    assert "safetensors only" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def adapter_on(base, out, quantize: bool):
    model = load_model(base, quant=QuantFormat() if quantize else None)
    apply_lora(model, LoraSpec(r=4, alpha=8))
    randomise_lora_b(model)
    save_adapter(model, out, LoraSpec(r=4, alpha=8), str(base))
    return model


def test_merge_bf16_base(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    run = tmp_path / "run"
    unmerged = adapter_on(base, run / "adapter", quantize=False)
    (run / "recipe.yaml").write_text("model: tiny\n")
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "recipe.yaml").read_text() == "model: tiny\n"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    # One bf16 rounding of W + scaling*B@A versus bf16 adapters in the forward (bound 3%).
    assert rel(logits(merged), logits(unmerged)) < 0.03
    assert rel(logits(merged), logits(AutoModelForCausalLM.from_pretrained(base))) > 0.1


def test_merge_4bit_base_dequantises(tmp_path):
    src = save_tiny("llama-tied", tmp_path / "src")
    assert main(["quantize", str(src), str(tmp_path / "q4")]) == 0
    unmerged = adapter_on(tmp_path / "q4", tmp_path / "adapter", quantize=True)
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel(logits(merged), logits(unmerged)) < 0.03
    # --base overrides the adapter's base: the original bf16 weights give a different model.
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "m2"), "--base", str(src)]) == 0
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    assert not torch.equal(logits(other), logits(merged))
