"""PEFT-format adapters: ours load in PEFT (16-bit and bitsandbytes 4-bit bases) with our logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.adapters.peft_format import load_adapter, save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.quant.format import QuantFormat
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.adapters.surgery import apply_lora
from tiny_models import randomise_lora_b, save_tiny, tokens

peft = pytest.importorskip("peft")
LORA = dict(r=4, alpha=8, dropout=0.0, use_rslora=False)


def spec(targets="all-linear", rslora=False) -> LoraSpec:
    return LoraSpec(**{**LORA, "use_rslora": rslora}, targets=targets)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("base") / "m")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits.float()


def assert_same_model(theirs: torch.Tensor, ours: torch.Tensor, base: torch.Tensor) -> None:
    """Equal up to bf16 rounding of the activations, and the adapters visibly matter.

    Two stacks with the same weights but their own order of bf16 operations differ by a few bf16
    ulps per logit; the relative norm measured here is 1.0% (16-bit base) and 1.4% (bnb 4-bit base),
    bound 3%, while the adapters move the logits by ~40% of their norm (randomise_lora_b, std 0.05).
    """
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(theirs, ours) < 0.03
    assert rel(ours, base) > 5 * rel(theirs, ours)


def adapted(base, quantize: bool, targets="all-linear", rslora=False):
    model = load_model(base, quant=QuantFormat() if quantize else None)
    apply_lora(model, spec(targets, rslora))
    randomise_lora_b(model)
    return model


def save(model, base, out, targets="all-linear", rslora=False):
    return save_adapter(model, out, spec(targets, rslora), str(base))


def test_files_follow_peft(base, tmp_path):
    save(adapted(base, True), base, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 14


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_reads_ours_on_16bit_base(base, tmp_path, rslora):
    ours = adapted(base, quantize=False, rslora=rslora)
    save(ours, base, tmp_path / "a", rslora=rslora)
    plain = AutoModelForCausalLM.from_pretrained(base)
    before = logits(plain)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a")
    assert_same_model(logits(theirs), logits(ours), before)


def test_peft_reads_ours_on_bnb_4bit_base(base, tmp_path):
    from transformers import BitsAndBytesConfig

    ours = adapted(base, quantize=True)
    save(ours, base, tmp_path / "a")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base_4bit = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map="cpu")
    before = logits(base_4bit)
    theirs = peft.PeftModel.from_pretrained(base_4bit, tmp_path / "a")
    # bitsandbytes quantises to the same bytes as ours; its CPU matmul rounds on its own.
    assert_same_model(logits(theirs), logits(ours), before)


def test_subset_targets_round_trip(base, tmp_path):
    ours = adapted(base, quantize=True, targets=r"re:model\.layers\.0\.self_attn\.(q|v)_proj")
    save(ours, base, tmp_path / "a", targets=r"re:model\.layers\.0\.self_attn\.(q|v)_proj")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # leaf names would also hit layer 1
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "a")
    assert sum("lora_A" in n for n, _ in theirs.named_parameters()) == 2
    again = load_model(base)
    assert load_adapter(again, tmp_path / "a") == [f"model.layers.0.self_attn.{p}_proj" for p in "qv"]
    assert torch.equal(logits(again), logits(ours))


def test_load_adapter_errors(base, tmp_path):
    with pytest.raises(UsageError, match="no adapter_config.json"):
        load_adapter(load_model(base), tmp_path)
    save(adapted(base, True), base, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(UsageError, match=r"has lora_A \(4, \d+\) and lora_B \(\d+, 4\), but the config says r=8"):
        load_adapter(load_model(base), tmp_path / "a")
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UsageError, match=r"lacks a DoRA magnitude"):  # a DoRA config on LoRA weights
        load_adapter(load_model(base), tmp_path / "a")
    path.write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(UsageError, match=r"tensors for modules it does not select \[.*mlp\.down_proj"):
        load_adapter(load_model(base), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match="no adapter_model.safetensors"):
        load_adapter(load_model(base), tmp_path / "a")


def test_save_refuses_foreign_folder(base, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an adapter folder"):
        save(adapted(base, True), base, tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
