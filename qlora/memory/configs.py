"""Model shapes for the memory planner: built-in published architectures and config.json parsing.

The planner needs only the shapes of a LLaMA-style decoder (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM): hidden size h, MLP size i, layers L, query heads, key/value heads (GQA), head
dimension, vocabulary V, whether `lm_head` shares the embedding matrix, and which projections carry
biases (Qwen2 has biases on q/k/v). Each decoder layer holds seven linear layers:

    q_proj h -> heads*d    k_proj, v_proj h -> kv_heads*d    o_proj heads*d -> h
    gate_proj, up_proj h -> i                                  down_proj i -> h

plus two RMSNorm weights (h each); the model adds the embedding (V x h), a final norm (h) and an
untied `lm_head` (V x h). The built-in numbers are the published `config.json` values of each model;
`tests/test_memory_plan.py` checks the resulting parameter counts against the published counts and
against transformers' own modules.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass

from qlora.errors import UsageError
from qlora.memory.moe_models import MOE_ALIASES, MOE_CONFIGS
from qlora.memory.moe_spec import MoeSpec, moe_spec_from_config, parameter_counts

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of one decoder layer, in forward order (PEFT's "all-linear" minus lm_head)."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a LLaMA-style decoder (names follow HF `config.json`)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    qkv_bias: bool = False
    """Biases on q/k/v projections (Qwen2; LLaMA with `attention_bias`)."""
    o_bias: bool = False
    mlp_bias: bool = False
    moe: MoeSpec | None = None
    """The routed experts of a mixture-of-experts model (`qlora.memory.moe_spec`); None when dense."""

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size"):
            _check_positive_int(f"{self.name}: {field}", getattr(self, field))
        if self.head_dim is not None:
            _check_positive_int(f"{self.name}: head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(
                f"{self.name}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def head_dimension(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dimension

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dimension

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def bias_sizes(self) -> dict[str, int]:
        """Bias elements per linear layer of one decoder layer (0 where there is none)."""
        shapes = self.linear_shapes()
        has_bias = {"q_proj": self.qkv_bias, "k_proj": self.qkv_bias, "v_proj": self.qkv_bias,
                    "o_proj": self.o_bias, "gate_proj": self.mlp_bias, "up_proj": self.mlp_bias,
                    "down_proj": self.mlp_bias}
        return {name: shapes[name][1] if has_bias[name] else 0 for name in LINEAR_NAMES}

    def linear_weight_params(self) -> int:
        """Weight elements of all decoder linear layers (the part that is quantised to 4 bits)."""
        if self.moe is not None:
            counts = parameter_counts(self)
            return counts["quantised_linears"] + counts["experts"]
        per_layer = sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())
        return per_layer * self.num_hidden_layers

    def unquantised_params(self) -> int:
        """Embedding, untied lm_head, RMSNorm weights and linear biases (kept in compute dtype)."""
        if self.moe is not None:
            return parameter_counts(self)["unquantised"]
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        biases = sum(self.bias_sizes().values()) * self.num_hidden_layers
        return embeddings + norms + biases

    def num_parameters(self) -> int:
        """Total parameters, counting a tied embedding once (as `model.num_parameters()` does)."""
        return self.linear_weight_params() + self.unquantised_params()


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _llama(name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int,
           tied: bool = False, qkv_bias: bool = False) -> ModelShape:
    return ModelShape(name=name, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      tie_word_embeddings=tied, qkv_bias=qkv_bias)


def _qwen(name: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelShape:
    return _llama(name, h, i, layers, heads, kv, vocab, tied=tied, qkv_bias=True)


# Values of each model's published config.json (hidden, intermediate, layers, heads, kv heads, vocab);
# the mixture-of-experts models (`qlora.memory.moe_models`) are added below `shape_from_config`.
BUILTIN_MODELS: dict[str, ModelShape] = {m.name: m for m in (
    # LLaMA 1 (Touvron et al. 2023, Table 2; huggyllama/llama-* configs); "33b" is the paper's 32.5B.
    _llama("llama-7b", 4096, 11008, 32, 32, 32, 32000),
    _llama("llama-13b", 5120, 13824, 40, 40, 40, 32000),
    _llama("llama-33b", 6656, 17920, 60, 52, 52, 32000),
    _llama("llama-65b", 8192, 22016, 80, 64, 64, 32000),
    # Llama 3 (meta-llama/Meta-Llama-3-8B, -70B configs): GQA with 8 kv heads, 128,256 tokens.
    _llama("llama3-8b", 4096, 14336, 32, 32, 8, 128256),
    _llama("llama3-70b", 8192, 28672, 80, 64, 8, 128256),
    # Mistral 7B v0.1 (mistralai/Mistral-7B-v0.1 config).
    _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    # Qwen2.5 (Qwen/Qwen2.5-* configs): q/k/v biases; the three smallest tie embeddings.
    _qwen("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied=True),
    _qwen("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, tied=True),
    _qwen("qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936, tied=True),
    _qwen("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, tied=False),
    _qwen("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064, tied=False),
    _qwen("qwen2.5-32b", 5120, 27648, 64, 40, 8, 152064, tied=False),
    _qwen("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, tied=False),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config; the model this project embeds).
    _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tied=True),
)}

# Published checkpoints whose shapes equal a built-in's (Llama-2 7B / 13B kept LLaMA-1's shapes).
ALIASES = {"llama2-7b": "llama-7b", "llama2-13b": "llama-13b"}

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def shape_from_config(config: dict, name: str = "config") -> ModelShape:
    """Read a HF LLaMA-style `config.json` dict; a missing or bad field raises `UsageError`."""
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise UsageError(f"{name}: missing field(s) {', '.join(missing)} "
                         f"(needs a LLaMA-style config with {', '.join(_REQUIRED)})")
    attention_bias = bool(config.get("attention_bias", False))
    return ModelShape(
        name=name,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim"),
        qkv_bias=attention_bias or config.get("model_type") in ("qwen2", "qwen2_moe"),
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        moe=moe_spec_from_config(config, name),
    )


BUILTIN_MODELS.update({name: shape_from_config(config, name) for name, config in MOE_CONFIGS.items()})
ALIASES.update(MOE_ALIASES)


def builtin_shape(name: str) -> ModelShape | None:
    """The built-in shape of a name as people write it: `llama3-8b`, `LLAMA3-8B`, `Llama-2-7b-hf`,
    `meta-llama/Meta-Llama-3-8B`, `models/llama-65b` (a folder named after its model); else None."""
    key = re.sub(r"[_\s]+", "-", os.path.basename(name.rstrip("/\\")).lower())
    key = re.sub(r"^meta-", "", re.sub(r"-(hf|instruct|chat)$", "", key))
    key = re.sub(r"^llama-(\d)-", r"llama\1-", key)
    key = ALIASES.get(key, key)
    return BUILTIN_MODELS.get(key)


def did_you_mean(name: str) -> str:
    """` (did you mean 'llama3-8b'?)` for a name close to a built-in one, else ``."""
    key = os.path.basename(name.rstrip("/\\")).lower().replace("_", "-")
    close = difflib.get_close_matches(key, [*BUILTIN_MODELS, *ALIASES], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def model_shape(model: str) -> ModelShape:
    """A built-in name (case-insensitive) or a path to a `config.json` (or a folder holding one)."""
    builtin = BUILTIN_MODELS.get(ALIASES.get(model.lower(), model.lower()))
    if builtin is not None:
        return builtin
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise UsageError(f"MODEL {model!r} is neither a built-in model nor a config.json path{did_you_mean(model)}; "
                         f"built-in models: {', '.join(BUILTIN_MODELS)}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"MODEL {path!r}: cannot read as JSON ({err})") from err
    if not isinstance(config, dict):
        raise UsageError(f"MODEL {path!r}: expected a JSON object, got {type(config).__name__}")
    return shape_from_config(config, name=path)
