"""`qlora export --gguf`: transformers reads our GGUF back (its own GGUF reader, `gguf_file=`) with
the logits of the model `qlora merge` writes; the tokenizer, chat template and Modelfile are there;
bad input exits 2 with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora.adapters.merge import merge_adapter
from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.cli import main
from qlora.gguf.export import export_gguf
from qlora.hf.export import quantize_folder
from qlora.hf.load import load_model
from tiny_models import randomise_lora_b, tiny_config

SPEC = LoraSpec(r=4, alpha=8, targets="all-linear")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]


def _config(family: str, vocab: int):
    import transformers as tf

    if family == "qwen3":  # head_dim 128 as every Qwen3 has: transformers' GGUF reader assumes it
        config = tf.Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                max_position_embeddings=64, tie_word_embeddings=True)
    elif family == "gemma3":  # query scale 1/sqrt(256) as Gemma 3 (not 27B) has: llama.cpp and the reader assume it
        config = tf.Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                                     query_pre_attn_scalar=256, max_position_embeddings=64, sliding_window=32)
    else:
        config = tiny_config(family)
        config.vocab_size = vocab
    return config


def save_model(family: str, folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random tiny ``family`` model (bf16) with ``tokenizer``'s vocabulary, saved with it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family, len(tokenizer))
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_lora(base: Path, out: Path, tokenizer=None) -> Path:
    model = load_model(base, quant=None)
    apply_lora(model, SPEC)
    randomise_lora_b(model)
    save_adapter(model, out, SPEC, str(base), tokenizer=tokenizer)
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def read_back(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


def merged_model(adapter: Path, out: Path, dtype: str = "bf16"):
    from transformers import AutoModelForCausalLM

    from qlora.dtypes import torch_dtype

    merge_adapter(adapter, out, dtype=torch_dtype(dtype))
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def ids_for(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("hello world, how are you today? What is AI?")["input_ids"]])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_gguf_reads_back_with_the_merged_logits(family, work, tok):
    base = save_model(family, work / f"{family}-base", tok)
    adapter = save_lora(base, work / f"{family}-adapter")
    out = export_gguf(adapter, work / f"{family}.gguf", type_name="bf16")
    ids = ids_for(tok)
    want = logits_of(merged_model(adapter, work / f"{family}-merged"), ids)
    got = logits_of(read_back(out), ids)
    assert torch.equal(got, want), (got - want).abs().max()


def test_f16_and_q8_0_against_the_merged_model(work, tok):
    base = save_model("llama", work / "types-base", tok)
    adapter = save_lora(base, work / "types-adapter")
    ids = ids_for(tok)
    f16 = export_gguf(adapter, work / "types-f16.gguf", type_name="f16")
    assert torch.equal(logits_of(read_back(f16), ids), logits_of(merged_model(adapter, work / "m16", "fp16"), ids))
    want = logits_of(merged_model(adapter, work / "m-bf16"), ids)
    q8 = logits_of(read_back(export_gguf(adapter, work / "types-q8.gguf", type_name="q8_0")), ids)
    q4 = logits_of(read_back(export_gguf(adapter, work / "types-q4.gguf", type_name="q4_0")), ids)
    # Q8_0 rounds each weight to 1/254 of its block's max (~0.2% relative error); Q4_0 to 1/14:
    # the logits move accordingly, Q4_0 several times more than Q8_0, and both stay near.
    err8, err4 = (q8 - want).abs().max().item(), (q4 - want).abs().max().item()
    assert 0 < err8 < 0.05 * want.abs().max().item()
    assert err4 > 3 * err8


def test_a_4bit_base_is_dequantised_exactly(work, tok):
    base = save_model("llama", work / "nf4-src", tok)
    quantize_folder(str(base), work / "nf4-base")
    tok.save_pretrained(work / "nf4-base")
    adapter = save_lora(work / "nf4-base", work / "nf4-adapter")
    out = export_gguf(adapter, work / "nf4.gguf")
    ids = ids_for(tok)
    assert torch.equal(logits_of(read_back(out), ids), logits_of(merged_model(adapter, work / "nf4-merged"), ids))


def test_tokenizer_template_and_modelfile(work, tok):
    from transformers import AutoTokenizer

    from helpers_tokenizer import CHATML

    base = save_model("llama", work / "tok-base", tok)
    tok.chat_template = CHATML + "{# trained with #}"
    adapter = save_lora(base, work / "tok-adapter", tokenizer=tok)  # a recipe's own template
    out = export_gguf(adapter, work / "tok.gguf")
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "hello world <|im_start|>user\nWhat is AI?<|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.chat_template == tok.chat_template
    assert back.eos_token == "<|im_end|>"
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("FROM ./tok.gguf\nTEMPLATE \"\"\"{{ if .System }}<|im_start|>system")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_bad_input_exits_2_and_writes_nothing(work, tok, capsys):
    base = save_model("llama", work / "bad-base", tok)
    adapter = save_lora(base, work / "bad-adapter")
    other = save_model("llama", work / "bad-other", tok, intermediate_size=96)
    gpt2 = work / "bad-gpt2"
    from tiny_models import save_tiny

    save_tiny("gpt2", gpt2)
    out = work / "bad" / "x.gguf"
    out.parent.mkdir()
    cases = {
        "gpt2": ([str(gpt2), "--gguf", str(out)], "architecture 'gpt2' cannot be exported to GGUF; supported: llama"),
        "type": ([str(adapter), "--gguf", str(out), "--type", "q2_k"], "invalid choice: 'q2_k'"),
        "base": ([str(adapter), "--gguf", str(out), "--base", str(other)], "adapter update for 'model.layers.0.mlp"),
        "suffix": ([str(adapter), "--gguf", str(out.with_suffix(".bin"))], "must end in .gguf"),
    }
    for name, (argv, message) in cases.items():
        with pytest.raises(SystemExit) if name == "type" else _no_raise():
            assert main(["export", *argv]) == 2, name
        assert message in capsys.readouterr().err, name
        assert _names(out.parent) == set(), name
    out.write_bytes(b"not ours")
    assert main(["export", str(adapter), "--gguf", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(adapter), "--gguf", str(out), "--overwrite"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert out.read_bytes() == b"not ours" and _names(out.parent) == {"x.gguf"}
    out.unlink()
    assert main(["export", str(adapter), "--gguf", str(out)]) == 0
    assert main(["export", str(adapter), "--gguf", str(out), "--type", "q8_0", "--overwrite"]) == 0
    assert _names(out.parent) == {"x.gguf", "x.Modelfile"}


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
