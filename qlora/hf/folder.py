"""Where a model lives and what it is: a folder, a cached hub id or a built-in name -> a local
folder; its transformers config (and any bitsandbytes 4-bit `quantization_config`); its tokenizer;
the name of a tied output projection."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from qlora.errors import UsageError
from qlora.hf.embedded import EMBEDDED_MODELS, builtin_folder


def model_folder(name_or_path: str | Path) -> Path:
    """A local folder for a built-in name, a folder path, or a hub id already in the local HF cache."""
    resolved = Path(builtin_folder(name_or_path)).expanduser()
    if resolved.is_dir():
        return resolved
    name = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not resolved.exists():
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as err:  # offline, unknown repo, no network: one message for all
            raise UsageError(f"model {name!r}: not a local folder and not downloadable ({err})") from err
    raise UsageError(
        f"model {name!r}: no such folder; expected a Hugging Face model folder (config.json + "
        f"*.safetensors), a hub id, or a built-in name ({', '.join(EMBEDDED_MODELS)})"
    )


def shareable_name(name_or_path: str | Path) -> str:
    """How another program finds this model: an existing folder as an absolute path, a built-in
    name as its built folder, anything else (a hub id) unchanged.

    Written as an adapter's `base_model_name_or_path`, so `peft.AutoPeftModelForCausalLM` loads
    the adapter from any working directory (it knows neither our built-in names nor our cwd).
    """
    folder = Path(builtin_folder(name_or_path)).expanduser()
    return str(folder.resolve()) if folder.is_dir() else str(name_or_path)


def load_config(folder: Path, trust_remote_code: bool = False):
    """The model's transformers config, with a clear error for a missing or unreadable config.json."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UsageError(f"{folder / 'config.json'}: cannot be read as a transformers config ({err})") from err


def bnb_4bit_config(config) -> dict | None:
    """The config's bitsandbytes 4-bit ``quantization_config`` as a dict, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit"):
        return qc
    raise UsageError(
        f"quantization_config {qc.get('quant_method')!r} (load_in_4bit={qc.get('load_in_4bit')}) is "
        "not supported; qlora loads unquantised folders or bitsandbytes 4-bit ones"
    )


def tied_output_name(model: nn.Module) -> str | None:
    """The fqn of the output projection (lm_head) when it is tied to the input embedding."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of a model folder, hub id or built-in name (a pad token is set to eos if absent),
    with the recipe's `data.chat_template` (a name or .jinja file) when one is given."""
    from qlora.hf.chat_template import set_chat_template

    from transformers import AutoTokenizer

    folder = model_folder(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UsageError(f"{folder}: cannot load a tokenizer ({err})") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return set_chat_template(tok, chat_template)
