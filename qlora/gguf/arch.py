"""The architectures `qlora export --gguf` writes, in llama.cpp's conventions.

For each supported transformers ``model_type``: the llama.cpp architecture name, the
hyper-parameters llama.cpp reads (``<arch>.block_count``, ``<arch>.rope.freq_base``, ...), and the
value changes llama.cpp's layout needs (tensor names come from gguf's ``TensorNameMap``):

- llama, mistral (written as llama, as llama.cpp does): llama.cpp applies rotary embeddings to
  interleaved pairs (x0, x1), (x2, x3), ... while transformers rotates the two halves of each head.
  The rows of q_proj / k_proj are therefore permuted per head: (heads, 2, head_dim/2, in) ->
  (heads, head_dim/2, 2, in). A pure permutation, so exact; transformers' GGUF reader undoes it.
  qwen2, qwen3, gemma and phi3 use llama.cpp's "neox" rotation (halves), so no permutation.
- gemma family: Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w, so every norm weight is
  written as 1 + w (in fp32, the type llama.cpp keeps 1-D tensors in: exact for bf16 w).
- rope scaling: "linear" is two keys; Llama 3's frequency-dependent scaling is a ``rope_freqs``
  tensor of per-frequency divisors (Llama 3.1's published formula); anything else is refused.

Anything not listed exits 2 naming the architecture and the supported ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from qlora.errors import UsageError

ROPE_FREQS = "rope_freqs.weight"  # the extra tensor Llama 3's rope scaling adds
SLIDING_WINDOW = ("gemma2", "gemma3", "phi3")  # llama.cpp architectures that read a sliding window


@dataclass(frozen=True)
class Arch:
    """How one transformers ``model_type`` becomes GGUF."""

    gguf: str              # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool = False
    norm_plus_one: bool = False
    softcapping: bool = False  # gemma2 writes attention / final logit soft-capping


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma": Arch("gemma", norm_plus_one=True),
    "gemma2": Arch("gemma2", norm_plus_one=True, softcapping=True),
    "gemma3": Arch("gemma3", norm_plus_one=True),
    "gemma3_text": Arch("gemma3", norm_plus_one=True),
    "phi3": Arch("phi3"),
}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def architecture(config) -> Arch:
    """The `Arch` of a transformers config, or a UsageError naming its model_type and the supported ones."""
    model_type = text_config(config).model_type
    if model_type not in ARCHITECTURES:
        raise UsageError(f"architecture {model_type!r} cannot be exported to GGUF; supported: "
                         f"{', '.join(ARCHITECTURES)} (SmolLM / SmolLM2 are llama)")
    return ARCHITECTURES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's ``rope_parameters`` (per layer type for Gemma 3:
    the full-attention entry) or the older ``rope_theta`` / ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def write_hparams(writer, config, arch: Arch, n_vocab: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for this model."""
    import gguf

    config = text_config(config)
    heads, dim = config.num_attention_heads, head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(int(dim * getattr(config, "partial_rotary_factor", 1.0)))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if getattr(config, "sliding_window", None) and arch.gguf in SLIDING_WINDOW:
        writer.add_sliding_window(config.sliding_window)
    if arch.softcapping:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    elif getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def check_supported(config) -> None:
    """Refuse what the written GGUF could not express: an unknown rope scaling, a query scale
    llama.cpp does not derive."""
    config = text_config(config)
    _, scaling = _rope(config)
    kind = scaling and scaling.get("rope_type", scaling.get("type"))
    if kind and kind not in ("linear", "llama3"):
        raise UsageError(f"rope scaling {kind!r} ({config.model_type}) cannot be exported to GGUF; "
                         "supported: none, linear, llama3")
    scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma 2 / 3; llama.cpp derives it
    if scalar is not None and scalar not in (head_dim(config), config.hidden_size // config.num_attention_heads):
        raise UsageError(f"query_pre_attn_scalar={scalar} ({config.model_type}) cannot be expressed in GGUF: "
                         f"llama.cpp scales queries by head_dim ({head_dim(config)}) or hidden_size / heads")


def rope_freqs(config) -> torch.Tensor | None:
    """Llama 3's rope scaling as llama.cpp's ``rope_freqs`` tensor (head_dim / 2 divisors), or None.

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency (divisor 1),
    longer than ``original / low_freq_factor`` are divided by ``factor``; in between the divisor
    blends smoothly: 1 / ((1 - s) / factor + s), s = (original / wavelength - low) / (high - low).
    """
    config = text_config(config)
    theta, scaling = _rope(config)
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim = head_dim(config)
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split rotary rows -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def value_transform(arch: Arch, config) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``(hf_key, tensor) -> tensor`` in llama.cpp's layout (see the module docstring)."""
    config = text_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if arch.permute_qk and ".q_proj." in key:
            return _permute(tensor, heads)
        if arch.permute_qk and ".k_proj." in key:
            return _permute(tensor, kv_heads)
        if arch.norm_plus_one and key.endswith("norm.weight"):
            return tensor.float() + 1
        return tensor

    return transform
