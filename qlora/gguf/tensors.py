"""The GGUF tensors of a (merged) model: planned from the checkpoint headers, then produced one
at a time.

GGUF puts every tensor's name, shape, type and offset in the header, before the data, so the plan
comes first: names (gguf's ``TensorNameMap``), shapes (safetensors headers; a bitsandbytes 4-bit
weight's shape is in its quant-state JSON), types and byte sizes, all without reading a weight.
Then each tensor is read (mmapped), dequantised exactly if 4-bit, merged with its adapter update
(`qlora.adapters.merge.AdapterUpdates`, the step `qlora merge` uses), put in llama.cpp's layout
(`qlora.gguf.arch`) and encoded, and freed before the next: the peak is one tensor, its fp32
copy and its encoding, never the model.

Types. The merge is `qlora merge --dtype bf16` (``--dtype fp16`` for ``--type f16``); ``bf16`` /
``f16`` write it as it is, the block types quantise it with gguf's numpy ``quants`` (Q8_0: 32
weights share one f16 scale; Q4_0 / Q5_0: 4 / 5 bits and a scale; Q4_1 / Q5_1: a scale and a
minimum). 1-D tensors (norms, biases) are F32, as llama.cpp keeps them; a 2-D weight whose rows
are not a whole number of blocks stays bf16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from qlora.adapters.merge import QUANT_STATE_INFIX, AdapterUpdates, dequantized_state_dict, quantised_parts
from qlora.errors import UsageError
from qlora.gguf.arch import ROPE_FREQS, Arch, rope_freqs, text_config, value_transform

SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; llama.cpp computes them


@dataclass(frozen=True)
class GGUFType:
    name: str
    ggml: str          # gguf.GGMLQuantizationType member
    file_type: str     # gguf.LlamaFileType member
    merge_dtype: torch.dtype


TYPES = {t.name: t for t in (
    GGUFType("bf16", "BF16", "MOSTLY_BF16", torch.bfloat16),
    GGUFType("f16", "F16", "MOSTLY_F16", torch.float16),
    GGUFType("q8_0", "Q8_0", "MOSTLY_Q8_0", torch.bfloat16),
    GGUFType("q4_0", "Q4_0", "MOSTLY_Q4_0", torch.bfloat16),
    GGUFType("q4_1", "Q4_1", "MOSTLY_Q4_1", torch.bfloat16),
    GGUFType("q5_0", "Q5_0", "MOSTLY_Q5_0", torch.bfloat16),
    GGUFType("q5_1", "Q5_1", "MOSTLY_Q5_1", torch.bfloat16),
)}


def gguf_type(name: str) -> GGUFType:
    if name not in TYPES:
        raise UsageError(f"--type {name!r} is not a GGUF type qlora writes; choose one of {', '.join(TYPES)}")
    return TYPES[name]


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: where it comes from and what it becomes."""

    name: str                  # GGUF name, e.g. blk.0.attn_q.weight
    key: str                   # checkpoint key ("" for a computed tensor)
    shape: tuple[int, ...]     # torch order (out, in)
    ggml: str                  # gguf.GGMLQuantizationType member

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.ggml]]
        return int(np.prod(self.shape)) // block * size


class Checkpoint:
    """The tensors of a model folder by key: 16-bit as stored, 4-bit ones dequantised exactly."""

    def __init__(self, ckpt) -> None:  # a qlora.hf.load._Checkpoint
        self.ckpt = ckpt
        self.parts = quantised_parts(ckpt.files)
        inner = {k for keys in self.parts.values() for k in keys}
        self.keys = [k for k in ckpt.files if k not in inner]

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.parts:
            return self.ckpt.shape(key)
        meta = next(k for k in self.parts[key] if QUANT_STATE_INFIX in k)
        return tuple(json.loads(bytes(self.ckpt.get(meta).tolist()).decode("utf-8"))["shape"])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.parts:
            return self.ckpt.get(key)
        return dequantized_state_dict({k: self.ckpt.get(k) for k in [key, *self.parts[key]]})[key]


def _encoded_type(shape: tuple[int, ...], wanted: GGUFType) -> str:
    import gguf

    if len(shape) == 1:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted.ggml]][0]
    return wanted.ggml if shape[-1] % block == 0 else "BF16"


def _drops_output(config, key: str, updates: AdapterUpdates) -> bool:
    """A tied lm_head some checkpoints also store: llama.cpp reuses token_embd (unless adapted)."""
    return key == "lm_head.weight" and getattr(text_config(config), "tie_word_embeddings", False) \
        and key not in updates.pairs


def plan(checkpoint: Checkpoint, arch: Arch, config, updates: AdapterUpdates, wanted: GGUFType) -> list[Planned]:
    """The GGUF tensors, in checkpoint order; an adapter that does not fit the base is refused first."""
    import gguf

    updates.check({key: checkpoint.shape(key) for key in checkpoint.keys if key in updates.pairs})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_member(arch)], text_config(config).num_hidden_layers)
    planned = []
    for key in checkpoint.keys:
        if key.endswith(SKIPPED) or _drops_output(config, key, updates):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"checkpoint tensor {key!r} has no GGUF name in llama.cpp's {arch.gguf!r} architecture")
        shape = checkpoint.shape(key)
        planned.append(Planned(name, key, shape, _encoded_type(shape, wanted)))
    freqs = rope_freqs(config)
    if freqs is not None:
        planned.insert(0, Planned(ROPE_FREQS, "", tuple(freqs.shape), "F32"))
    return planned


def arch_member(arch: Arch) -> str:
    """The gguf.MODEL_ARCH member named ``arch.gguf``."""
    import gguf

    return next(member.name for member, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf)


def encode(tensor: torch.Tensor, ggml: str) -> np.ndarray:
    """``tensor`` as the bytes (or values) GGUF stores for type ``ggml``."""
    import gguf

    if ggml == "F32":
        return tensor.float().numpy()
    if ggml == "F16":
        return tensor.to(torch.float16).numpy()
    return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType[ggml])


def produce(planned: list[Planned], checkpoint: Checkpoint, arch: Arch, config, updates: AdapterUpdates,
            wanted: GGUFType) -> Iterator[tuple[Planned, np.ndarray]]:
    """Each planned tensor, merged, in llama.cpp's layout and encoded: one at a time."""
    transform: Callable[[str, torch.Tensor], torch.Tensor] = value_transform(arch, config)
    for item in planned:
        if item.key == "":
            yield item, encode(rope_freqs(config), item.ggml)
            continue
        merged = updates.apply(item.key, checkpoint.get(item.key), wanted.merge_dtype)
        yield item, encode(transform(item.key, merged), item.ggml)
