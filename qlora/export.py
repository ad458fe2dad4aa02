"""Writing Hugging Face model folders: 4-bit exports (``qlora quantize``) and merged models (``qlora merge``).

Both produce an ordinary transformers folder (config.json, generation_config.json, safetensors,
tokenizer files), so ``transformers.AutoModelForCausalLM.from_pretrained`` reads them without qlora.

4-bit export. ``Linear4bit.state_dict()`` is bitsandbytes' Linear4bit layout (packed ``weight`` plus
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the JSON
``weight.quant_state.bitsandbytes__<type>``), and config.json gets the ``quantization_config`` that
transformers' bitsandbytes integration expects (``llm_int8_skip_modules`` lists the linears kept in
16 bits). transformers then loads the packed bytes as they are: no re-quantisation on either side,
so its dequantised weights equal ours bit for bit. bitsandbytes has no Int4 format, so Int4 models
cannot be exported this way.

Merge. Each ``LoRALinear`` becomes one ``nn.Linear`` holding W + scaling * B @ A (fp32 sum, one
rounding to the output dtype); W is the dequantised 4-bit weight when the base was loaded 4-bit, or
the original 16-bit weight when the base folder is unquantised. Remaining 4-bit layers are
dequantised. The recipe the adapter was trained with is copied beside the result for provenance.

Every folder is written to a temporary sibling and renamed into place; an existing output is
refused unless the caller asks to replace it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from qlora.errors import UsageError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
RECIPE_FILE = "recipe.yaml"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ================================================================================ folder plumbing


@contextlib.contextmanager
def atomic_folder(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; move it to ``final`` when the block succeeds.

    If ``final`` exists by then it is replaced when ``replace`` is true; otherwise the existing
    folder is kept (another process built it concurrently) and the temporary one is discarded.
    On an exception nothing is left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"output {out_dir} already exists; choose another path or pass --overwrite")
    return out_dir


def save_state_dict(folder: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``tensors`` as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``.

    Shards are cut at tensor boundaries once they would exceed ``max_shard_bytes`` (as transformers
    does), so a folder written here loads with ``from_pretrained`` and with ``qlora.model.load_model``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    storages: set[int] = set()
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # e.g. one codebook shared by all layers
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SAFE_WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with transformers' conventions: a tied lm_head is left out, and
    GPT-2 ``Conv1D`` weights that are still 16-bit go back to their (in, out) layout."""
    from qlora.model import tied_output_name

    tensors = model.state_dict()
    tied = tied_output_name(model)
    if tied is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(tied + ".")}
    for fqn in getattr(model, "qlora_conv1d", ()):
        if isinstance(model.get_submodule(fqn), nn.Linear):
            tensors[f"{fqn}.weight"] = tensors[f"{fqn}.weight"].t()
    return tensors


def write_model_folder(model: nn.Module, out: Path, source: Path, config_updates: dict) -> None:
    """Weights, config.json (plus ``config_updates``), generation config and tokenizer files."""
    save_state_dict(out, hf_state_dict(model))
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config.update(config_updates)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")
    copy_tokenizer_files(source, out)


# ================================================================================ 4-bit export


def bnb_quantization_config(model: nn.Module) -> dict:
    """The bitsandbytes ``quantization_config`` describing the model's Linear4bit layers."""
    from qlora.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise UsageError("export: the model has no 4-bit layers (load it with quantize=True)")
    formats = {(m.quant_type, m.double_quant, m.compute_dtype) for m in layers}
    if len(formats) != 1:
        raise UsageError(f"export: the 4-bit layers mix formats {sorted(map(str, formats))}; bitsandbytes needs one")
    quant_type, double_quant, compute_dtype = formats.pop()
    if quant_type not in ("nf4", "fp4"):
        raise UsageError(f"export: quant_type={quant_type!r} has no bitsandbytes format; use nf4 or fp4")
    skip = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def export_quantized(model: nn.Module, out_dir: str | Path, source: str | Path, *, overwrite: bool = False) -> Path:
    """Write a 4-bit ``model`` (as loaded by ``load_model``) as a bitsandbytes-format HF folder.

    ``source`` is the folder it was loaded from (tokenizer and generation config are copied).
    """
    from qlora.nn import Linear4bit

    out_dir = check_output(out_dir, overwrite)
    packed = {m.weight.dtype for m in model.modules() if isinstance(m, Linear4bit)}
    if packed - {torch.uint8}:
        raise UsageError(f"export: packed weights stored as {packed}; export needs quant_storage=torch.uint8")
    updates = {"quantization_config": bnb_quantization_config(model)}
    with atomic_folder(out_dir, replace=overwrite) as tmp:
        write_model_folder(model, tmp, Path(source), updates)
    return out_dir


def quantize_folder(
    src: str,
    out_dir: str | Path,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Load ``src`` quantised (the ``qlora quantize`` command) and export it."""
    from qlora.model import load_model, model_folder

    check_output(out_dir, overwrite)
    model = load_model(
        src, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
    )
    return export_quantized(model, out_dir, model_folder(src), overwrite=overwrite)


# ================================================================================ merge


def merge_lora(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold every adapter into its base and dequantise every 4-bit layer, in place: a plain model."""
    from qlora.surgery import swap_modules
    from qlora.nn import Linear4bit, LoRALinear

    swap_modules(model, lambda m, _: isinstance(m, LoRALinear), lambda m: m.merged_linear(dtype))
    swap_modules(model, lambda m, _: isinstance(m, Linear4bit), lambda m: m.to_linear(dtype))
    return model


def find_recipe(adapter_dir: Path) -> Path | None:
    """``recipe.yaml`` in the adapter folder or in its parent (the training run folder)."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / RECIPE_FILE).is_file():
            return folder / RECIPE_FILE
    return None


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Merge a PEFT LoRA adapter into its base and write a ``dtype`` HF folder (``qlora merge``).

    ``base`` defaults to the adapter's ``base_model_name_or_path``. An unquantised base is loaded in
    ``dtype`` (the original weights); a bitsandbytes 4-bit base is dequantised.
    """
    from qlora.adapter import load_adapter, read_adapter_config
    from qlora.model import load_model, model_folder

    adapter_dir = Path(adapter_dir)
    out_dir = check_output(out_dir, overwrite)
    config = read_adapter_config(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{adapter_dir}: the adapter names no base_model_name_or_path; pass --base")
    model = load_model(base, quantize=False, compute_dtype=dtype)
    load_adapter(model, adapter_dir, dtype=dtype)
    merge_lora(model, dtype)
    recipe = find_recipe(adapter_dir)
    with atomic_folder(out_dir, replace=overwrite) as tmp:
        write_model_folder(model, tmp, model_folder(base), {"dtype": _DTYPE_NAMES[dtype]})
        if recipe is not None:
            shutil.copy2(recipe, tmp / RECIPE_FILE)
    return out_dir
