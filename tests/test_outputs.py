"""Outputs others can use: folders with a plain mkdir's permissions, adapters that name their base
so that `peft.AutoPeftModelForCausalLM` loads them from anywhere."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from qlora.adapters.merge import merge_adapter
from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.hf.export import quantize_folder
from qlora.hf.folder import shareable_name
from qlora.hf.load import load_model
from tiny_models import randomise_lora_b, save_tiny, tokens

SPEC = LoraSpec(r=4, alpha=8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _adapted(base: Path | str) -> torch.nn.Module:
    model = load_model(base, quant=None)
    apply_lora(model, SPEC)
    randomise_lora_b(model)
    return model


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_adapter_merged_and_quantised_folders_get_plain_permissions(tmp_path, umask):
    base = save_tiny("llama", tmp_path / "base")
    save_adapter(_adapted(base), tmp_path / "adapter", SPEC, str(base))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    quantize_folder(str(base), tmp_path / "q4")
    expected = {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}  # 0755 / 0644 under umask 022
    for name in ("adapter", "merged", "q4"):
        assert _modes(tmp_path / name) == expected, name


def test_adapter_names_its_base_absolutely_and_auto_peft_loads_it(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    save_tiny("llama", tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    ours = _adapted("base")  # a relative path, as a recipe would give it
    save_adapter(ours, tmp_path / "adapter", SPEC, "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    upcast = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16)
    assert {p.dtype for n, p in upcast.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's default
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    with torch.no_grad():
        plain = base(tokens()).logits.float()
    exact = PeftModel.from_pretrained(base, tmp_path / "adapter", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in exact.named_parameters() if "lora_" in n} == {torch.bfloat16}  # as trained
    with torch.no_grad():
        mine = ours(tokens()).logits.float()
        diffs = {name: (m(tokens()).logits.float() - mine).abs().max().item() for name, m in
                 (("upcast", upcast), ("bf16", exact))}
    # Both are our model up to bf16 rounding order (our LoRA update is one fused addmm): measured
    # 0.031 (2 bf16 ulps at these logits of magnitude ~3) either way; without the adapter, 1.6.
    assert max(diffs.values()) < 0.1 < (plain - mine).abs().max().item(), diffs


def test_shareable_name_keeps_hub_ids_and_resolves_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert shareable_name("model") == str(tmp_path.resolve() / "model")
    assert shareable_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # no such folder here
