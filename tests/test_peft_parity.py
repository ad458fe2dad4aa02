"""Our LoRA training signal equals PEFT's: same loss and same adapter gradients on one base."""

from __future__ import annotations

import pytest
import torch

from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.hf.load import load_model
from qlora.adapters.surgery import apply_lora
from tiny_models import save_tiny, tokens

peft = pytest.importorskip("peft")


def test_lora_gradients_equal_peft(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    folder = save_tiny("llama", tmp_path / "base")
    torch.manual_seed(0)
    ours = load_model(folder, quant=None, dtype=torch.float32)
    apply_lora(ours, LoraSpec(r=8, alpha=16, dtype="fp32"))
    with torch.no_grad():  # B starts at zero; make both A and B matter
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(ours, tmp_path / "adapter", LoraSpec(r=8, alpha=16, dtype="fp32"), str(folder))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)

    ids = tokens(2, 12)
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peers = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peers.keys() and len(mine) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in mine:
        torch.testing.assert_close(mine[name], peers[name], rtol=1e-5, atol=1e-7)
