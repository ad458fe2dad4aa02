"""Writing Hugging Face model folders from a loaded model: 4-bit exports (``qlora quantize``) and
the folders of merged models (``qlora.adapters.merge``).

Both are ordinary transformers folders (config.json, generation_config.json, safetensors,
tokenizer files), so ``transformers.AutoModelForCausalLM.from_pretrained`` reads them without qlora.

4-bit export. ``Linear4bit.state_dict()`` is bitsandbytes' Linear4bit layout (packed ``weight`` plus
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the JSON
``weight.quant_state.bitsandbytes__<type>``), and config.json gets the ``quantization_config`` that
transformers' bitsandbytes integration expects (``llm_int8_skip_modules`` lists the linears kept in
16 bits). transformers then loads the packed bytes as they are: no re-quantisation on either side,
so its dequantised weights equal ours bit for bit. bitsandbytes has no Int4 format, so Int4 models
cannot be exported this way. Folders are built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qlora.choices import BNB_QUANT_TYPES
from qlora.dtypes import hf_name
from qlora.errors import UsageError
from qlora.hf.files import copy_tokenizer_files, save_state_dict
from qlora.hf.folder import tied_output_name
from qlora.io import atomic_folder, check_output
from qlora.outputs import check_destination
from qlora.outputs import provenance, write_provenance
from qlora.quant.format import QuantFormat


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with transformers' conventions: a tied lm_head is left out, and
    GPT-2 ``Conv1D`` weights that are still 16-bit go back to their (in, out) layout."""
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

    formats = {m.format for m in model.modules() if isinstance(m, Linear4bit)}
    if not formats:
        raise UsageError("export: the model has no 4-bit layers (load it with a QuantFormat)")
    if len({(f.quant_type, f.double_quant, f.compute_dtype) for f in formats}) != 1:
        raise UsageError(f"export: the 4-bit layers mix formats {sorted(map(str, formats))}; bitsandbytes needs one")
    fmt = formats.pop()
    if fmt.quant_type not in BNB_QUANT_TYPES:
        raise UsageError(f"export: quant_type={fmt.quant_type!r} has no bitsandbytes format; use nf4 or fp4")
    skip = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": fmt.quant_type,
        "bnb_4bit_use_double_quant": fmt.double_quant,
        "bnb_4bit_compute_dtype": hf_name(fmt.compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def export_quantized(model: nn.Module, out_dir: str | Path, source: str | Path, *, overwrite: bool = False,
                     provenance: dict | None = None) -> Path:
    """Write a 4-bit ``model`` (as loaded by ``load_model``) as a bitsandbytes-format HF folder.

    ``source`` is the folder it was loaded from (tokenizer and generation config are copied);
    ``provenance`` a writer's record (`qlora.outputs`).
    """
    from qlora.nn import Linear4bit
    from qlora.nn.experts4bit import Experts4bit

    out_dir = check_output(out_dir, overwrite)
    experts = [fqn for fqn, m in model.named_modules() if isinstance(m, Experts4bit)]
    if experts:
        raise UsageError(
            f"export: {len(experts)} fused expert weights (e.g. {experts[0]!r}) are in qlora's 4-bit experts store, "
            "which bitsandbytes' 4-bit format cannot describe (it quantises nn.Linear only) and transformers would "
            "not load; keep the 16-bit checkpoint (qlora quantises experts while loading) or write a bf16 folder "
            "with `qlora merge`"
        )
    packed = {m.weight.dtype for m in model.modules() if isinstance(m, Linear4bit)}
    if packed - {torch.uint8}:
        raise UsageError(f"export: packed weights stored as {packed}; export needs quant_storage=torch.uint8")
    updates = {"quantization_config": bnb_quantization_config(model)}
    with atomic_folder(out_dir, replace=overwrite) as tmp:
        write_model_folder(model, tmp, Path(source), updates)
        write_provenance(tmp, provenance)
    return out_dir


def quantize_folder(src: str, out_dir: str | Path, fmt: QuantFormat = QuantFormat(), *,
                    overwrite: bool = False) -> Path:
    """Load ``src`` quantised to ``fmt`` (the ``qlora quantize`` command) and export it."""
    from qlora.hf.folder import model_folder
    from qlora.hf.load import load_model

    inputs = [src] if Path(src).is_dir() else []
    check_destination(out_dir, overwrite, "quantized", inputs)
    model = load_model(src, quant=fmt)
    return export_quantized(model, out_dir, model_folder(src), overwrite=overwrite,
                            provenance=provenance("quantized", inputs))
