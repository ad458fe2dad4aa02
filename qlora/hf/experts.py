"""Stream a mixture-of-experts layer's fused parameters in, one expert at a time.

`qlora.hf.convert` says which checkpoint tensors make each fused parameter: the whole (E, ...)
stack (a fused checkpoint, ``save_pretrained(save_original_format=False)``, Granite-MoE, gpt-oss)
or one tensor per expert and part (Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down). Either way
expert e's 2-D slice is read on its own (a safetensors slice of a fused tensor reads only that
expert's bytes) and, for an expert weight in a 4-bit load, quantised into its `Experts4bit`
slots at once:

    peak = the 4-bit model + ONE expert's 16-bit matrix   (never the layer's 16-bit stack)

A 16-bit load (or a stacked tensor that is not an expert weight, e.g. per-expert biases) fills
the parameter in place, slice by slice. A slice whose shape disagrees with the model's is refused
naming the checkpoint tensor; so is a stack with an expert missing.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.hf.checks import check_tensor
from qlora.hf.convert import Piece, Sources, expert_parts
from qlora.nn.experts4bit import Experts4bit
from qlora.nn.moe import expert_parameter_names, is_experts
from qlora.quant.format import QuantFormat


class Reader(Protocol):
    files: dict

    def get(self, key: str) -> torch.Tensor: ...

    def expert(self, key: str, e: int) -> torch.Tensor: ...


def expert_weight_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Full name -> (experts module name, parameter name) of every fused expert weight."""
    return {f"{owner}.{name}" if owner else name: (owner, name)
            for owner, m in model.named_modules() if is_experts(m) for name in expert_parameter_names(m)}


def _expert_slice(ckpt: Reader, pieces: list[Piece], e: int, want: tuple[int, ...], fqn: str,
                  grid: list[list[str]] | None) -> torch.Tensor:
    """Expert e's slice of parameter ``fqn`` as stored (shape ``want``), from its pieces."""
    if grid is None:
        key, tensor = pieces[0].key, ckpt.expert(pieces[0].key, e)
    else:
        parts = [ckpt.get(k) for k in grid[e]]
        key, tensor = grid[e][0], torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    check_tensor(key, ckpt.files[key], tensor, floating=True)
    if tuple(tensor.shape) != want:
        raise UsageError(f"checkpoint tensor {key!r} (expert {e} of {fqn!r}) has shape {tuple(tensor.shape)}, "
                         f"but the model expects {want} for every expert")
    return tensor


def stream_stacked(model: nn.Module, ckpt: Reader, sources: Sources, fqns: set[str], fmt: QuantFormat | None,
                   compute_dtype: torch.dtype, device: torch.device) -> int:
    """Fill every stacked tensor in ``fqns``; expert weights go to 4 bits when ``fmt`` is given.

    Returns the number of expert weights stored in 4 bits.
    """
    weights = expert_weight_names(model)
    quantised = 0
    for fqn in sorted(fqns):
        owner_name, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, leaf)
        pieces = sources.pieces[fqn]
        stacked = any(p.expert is not None for p in pieces)
        grid = expert_parts(pieces, param.shape[0], fqn) if stacked else None
        want = tuple(param.shape[1:])
        if fmt is not None and fqn in weights:
            store = _quantised(owner, leaf, param.shape, ckpt, pieces, grid, fqn, fmt, device)
            del owner._parameters[leaf]
            setattr(owner, leaf, store)
            quantised += 1
            continue
        full = torch.empty(param.shape, dtype=compute_dtype if param.is_floating_point() else param.dtype,
                           device=device)
        for e in range(param.shape[0]):
            full[e].copy_(_expert_slice(ckpt, pieces, e, want, fqn, grid))
        owner._parameters[leaf] = nn.Parameter(full, requires_grad=False)
    return quantised


def _quantised(owner: nn.Module, leaf: str, shape: torch.Size, ckpt: Reader, pieces: list[Piece],
               grid: list[list[str]] | None, fqn: str, fmt: QuantFormat, device: torch.device) -> Experts4bit:
    """An `Experts4bit` filled expert by expert (nn.Linear orientation: a transposed layout is
    transposed per expert before quantising)."""
    e_count, a, b = shape
    out_f, in_f = (b, a) if owner.is_transposed else (a, b)
    store = Experts4bit(e_count, out_f, in_f, fmt, device=device)
    for e in range(e_count):
        stored = _expert_slice(ckpt, pieces, e, (a, b), fqn, grid)
        weight = stored.t() if owner.is_transposed else stored
        store.set_expert(e, weight.to(device=device, dtype=fmt.compute_dtype))
    return store


def refuse_foreign_quantisation(config, folder) -> None:
    """Exit 2 for a checkpoint in a quantised format qlora does not read (gpt-oss' MXFP4, FP8, ...)."""
    qc = getattr(config, "quantization_config", None)
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) if qc else None
    method = getattr(method, "value", method)
    if method in (None, "bitsandbytes"):
        return
    raise UsageError(
        f"{folder}: the checkpoint is stored as {method!r} (config.json quantization_config); qlora reads "
        "16-bit or bitsandbytes 4-bit checkpoints. Dequantise it with transformers first, e.g. "
        "AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True)) "
        "for MXFP4, then save_pretrained a bf16 copy and load that folder"
    )
