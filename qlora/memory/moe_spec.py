"""Mixture-of-experts shapes for the planner: what a MoE `config.json` says about its experts.

In transformers 5 every MoE family keeps its routed experts in two fused 3-D parameters per sparse
layer, `mlp.experts.gate_up_proj` (experts, 2 x moe_intermediate, hidden) and `mlp.experts.down_proj`
(experts, hidden, moe_intermediate); gpt-oss stores them transposed and adds per-expert biases; the
Granite-MoE family names the block `block_sparse_moe`. The router (`mlp.gate`, `mlp.router`) holds an
(experts, hidden) weight (an `nn.Linear` only in PhiMoE); the plan keeps every router in 16 bits,
apart from the quantised linears, and DeepSeek's in fp32 (`_keep_in_fp32_modules_strict`). Shared experts (DeepSeek's
`shared_experts`, Qwen2-MoE's `shared_expert` and its sigmoid `shared_expert_gate`) and the dense MLPs
of non-sparse layers are ordinary linears.

Which layers are sparse follows each family's modeling code: DeepSeek layers from
`first_k_dense_replace` on; Qwen-MoE layers l with (l + 1) % `decoder_sparse_step` == 0 that are not
in `mlp_only_layers`; every layer otherwise. The expert count is `num_local_experts` (Mixtral,
gpt-oss, Granite-MoE, PhiMoE), `num_experts` (Qwen-MoE, OLMoE) or `n_routed_experts` (DeepSeek); the
expert width `moe_intermediate_size`, else `intermediate_size`.

Parameter counts (`parameter_counts`) are what `model.num_parameters()` of the transformers model
gives; "active" counts what one token's forward multiplies with: attention, norms, routers, dense and
shared MLPs, its top-k routed experts and the lm_head, but not the input embedding table (a lookup).
Publishers differ on the embeddings (tests/test_memory_moe.py names each one's convention).

Pure arithmetic over a `ModelShape` (duck-typed here: `qlora.memory.configs` imports this module).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import UsageError

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
"""The fused 3-D expert parameters of one sparse block (`MoeSpec.block`: `mlp.experts.gate_up_proj`)."""
ALL_EXPERTS = "all-experts"


@dataclass(frozen=True)
class MoeSpec:
    """The mixture-of-experts part of a model's shape (names follow HF `config.json`)."""

    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    moe_layers: tuple[int, ...]
    """Indices of the decoder layers with a sparse block; the others have a dense MLP."""
    shared_intermediate_size: int = 0
    """Width of the shared-experts MLP every token passes (0: none)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE's sigmoid gate (hidden -> 1 linear) on the shared expert."""
    expert_bias: bool = False
    """Per-expert biases on both fused parameters (gpt-oss)."""
    router_bias: bool = False
    router_fp32: bool = False
    """The router weight is kept in fp32 (DeepSeek), else it is in the compute dtype."""
    attention_linears: tuple[tuple[str, int, int], ...] = ()
    """(name, in, out) of the attention linears where they are not LLaMA's q/k/v/o (DeepSeek's
    multi-head latent attention); empty means q/k/v/o of the shape's heads."""
    attention_widths: tuple[int, int, int, int] = ()
    """Per-token widths of the q, k, v and attention output SDPA sees, for the latent attention."""
    norm_width: int = 0
    """Per-token width of the extra RMSNorms inside attention (q/k norms, MLA's latent norms)."""
    extra_layer_params: int = 0
    """Other unquantised parameters per layer: those norms' weights, gpt-oss's attention sinks."""
    block: str = "mlp"
    """The sparse block's name inside `model.layers.N` (`block_sparse_moe` in the Granite-MoE family)."""
    norm_bias: bool = False
    """The decoder's norms are LayerNorms with biases (PhiMoE), not RMSNorms."""
    sdpa: bool = True
    """False where transformers has no SDPA path for the family (gpt-oss's attention sinks:
    `_supports_sdpa = False`); the plan then counts eager attention's seq x seq probabilities."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "experts_per_token", "moe_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise UsageError(f"num_experts_per_tok={self.experts_per_token} exceeds the {self.num_experts} experts")


def moe_spec_from_config(config: dict, name: str = "config") -> MoeSpec | None:
    """The MoE part of a HF `config.json` dict; None for a dense model (no or zero experts)."""
    experts = next((config[k] for k in EXPERT_COUNT_KEYS if config.get(k)), None)
    if not experts:
        return None
    top_k = config.get("num_experts_per_tok") or config.get("experts_per_token")
    if not top_k:
        raise UsageError(f"{name}: a MoE config ({experts} experts) needs num_experts_per_tok")
    h, family = config["hidden_size"], config.get("model_type", "")
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    shared = config.get("n_shared_experts") or 0
    shared_width = shared * width or config.get("shared_expert_intermediate_size") or 0
    attention, widths, norm_width, extra = _attention_extras(config, h, family)
    return MoeSpec(
        num_experts=experts, experts_per_token=top_k, moe_intermediate_size=width,
        moe_layers=_sparse_layers(config), shared_intermediate_size=shared_width,
        shared_expert_gate=bool(config.get("shared_expert_intermediate_size")) and not shared,
        expert_bias=family == "gpt_oss", router_bias=family == "gpt_oss",
        router_fp32=family.startswith("deepseek"), attention_linears=attention, attention_widths=widths,
        norm_width=norm_width, extra_layer_params=extra, sdpa=family != "gpt_oss",
        block="block_sparse_moe" if family.startswith("granitemoe") else "mlp", norm_bias=family == "phimoe")


def _sparse_layers(config: dict) -> tuple[int, ...]:
    first_dense = config.get("first_k_dense_replace") or 0
    step = config.get("decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or ())
    return tuple(layer for layer in range(config["num_hidden_layers"])
                 if layer >= first_dense and (layer + 1) % step == 0 and layer not in dense_only)


def _attention_extras(config: dict, h: int, family: str):
    """(latent-attention linears, their SDPA widths, extra norm width, extra params) per layer."""
    heads = config["num_attention_heads"]
    if config.get("kv_lora_rank"):  # DeepSeek multi-head latent attention
        rank, q_rank = config["kv_lora_rank"], config.get("q_lora_rank")
        qk, v = config["qk_nope_head_dim"] + config["qk_rope_head_dim"], config["v_head_dim"]
        q = (("q_a_proj", h, q_rank), ("q_b_proj", q_rank, heads * qk)) if q_rank else (("q_proj", h, heads * qk),)
        linears = (*q, ("kv_a_proj_with_mqa", h, rank + config["qk_rope_head_dim"]),
                   ("kv_b_proj", rank, heads * (config["qk_nope_head_dim"] + v)), ("o_proj", heads * v, h))
        norms = rank + (q_rank or 0)
        return linears, (heads * qk, heads * qk, heads * v, heads * v), norms, norms
    head_dim = config.get("head_dim") or h // heads
    kv_heads = config.get("num_key_value_heads") or heads
    if family == "olmoe":  # q_norm / k_norm over the whole q and k widths
        return (), (), (heads + kv_heads) * head_dim, (heads + kv_heads) * head_dim
    if family.startswith("qwen3"):  # q_norm / k_norm per head
        return (), (), (heads + kv_heads) * head_dim, 2 * head_dim
    return (), (), 0, heads if family == "gpt_oss" else 0


# ------------------------------------------------------------------------------------ shape arithmetic


def layer_linears(shape, sparse: bool) -> dict[str, tuple[int, int]]:
    """(in, out) of every `nn.Linear` of one decoder layer, named inside `model.layers.N`."""
    spec, h = shape.moe, shape.hidden_size
    if spec.attention_linears:
        attention = {f"self_attn.{n}": (i, o) for n, i, o in spec.attention_linears}
    else:
        attention = {f"self_attn.{n}": shape.linear_shapes()[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if not sparse:
        return {**attention, **_mlp("mlp", h, shape.intermediate_size)}
    shared = {}
    if spec.shared_intermediate_size:
        prefix = "mlp.shared_expert" if spec.shared_expert_gate else "mlp.shared_experts"
        shared = _mlp(prefix, h, spec.shared_intermediate_size)
        if spec.shared_expert_gate:
            shared["mlp.shared_expert_gate"] = (h, 1)
    return {**attention, **shared}


def _mlp(prefix: str, h: int, width: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.gate_proj": (h, width), f"{prefix}.up_proj": (h, width), f"{prefix}.down_proj": (width, h)}


def expert_matrices(shape) -> dict[str, tuple[int, int]]:
    """(in, out) of ONE expert's 2-D matrix in each fused parameter (each is quantised on its own),
    by the parameter's name inside `model.layers.N` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)."""
    h, width, block = shape.hidden_size, shape.moe.moe_intermediate_size, shape.moe.block
    gate_up, down = (f"{block}.{name}" for name in EXPERT_PARAMETERS)
    return {gate_up: (h, 2 * width), down: (width, h)}


def layer_kinds(shape) -> dict[bool, int]:
    """How many decoder layers are sparse (True) and dense (False)."""
    sparse = len(shape.moe.moe_layers)
    return {True: sparse, False: shape.num_hidden_layers - sparse}


def _bias_params(shape, sparse: bool) -> int:
    linears = layer_linears(shape, sparse)
    spec = shape.moe
    if spec.attention_linears:  # attention_bias puts biases on q_a / kv_a / o (DeepSeek)
        attention = sum(linears[f"self_attn.{n}"][1] for n in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")
                        if shape.o_bias and f"self_attn.{n}" in linears)
    else:
        sizes = shape.bias_sizes()
        attention = sum(sizes[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(o for n, (_, o) in linears.items() if n.startswith("mlp.")) if shape.mlp_bias else 0
    expert_outputs = sum(o for _, o in expert_matrices(shape).values())
    return attention + mlp + (spec.num_experts * expert_outputs if sparse and spec.expert_bias else 0)


def router_params(shape) -> int:
    """Router weights (and biases) of all sparse layers."""
    spec = shape.moe
    return len(spec.moe_layers) * spec.num_experts * (shape.hidden_size + spec.router_bias)


def parameter_counts(shape) -> dict[str, int]:
    """Parameter counts of a MoE shape: quantised linears, experts, unquantised, total and active."""
    spec, h = shape.moe, shape.hidden_size
    kinds = layer_kinds(shape)
    per_expert = sum(i * o for i, o in expert_matrices(shape).values())
    linears = {k: sum(i * o for i, o in layer_linears(shape, k).values()) for k in kinds}
    biases = {k: _bias_params(shape, k) for k in kinds}
    embedding = shape.vocab_size * h
    norms = ((2 * shape.num_hidden_layers + 1) * h * (1 + spec.norm_bias)  # weights (and LayerNorm biases)
             + shape.num_hidden_layers * spec.extra_layer_params)
    experts = kinds[True] * spec.num_experts * per_expert
    unquantised = (embedding * (1 if shape.tie_word_embeddings else 2) + norms + router_params(shape)
                   + sum(n * biases[k] for k, n in kinds.items()))
    idle_experts = spec.num_experts - spec.experts_per_token
    active_biases = sum(n * biases[k] for k, n in kinds.items())
    if spec.expert_bias:  # only the routed experts' biases are active
        active_biases -= kinds[True] * idle_experts * sum(o for _, o in expert_matrices(shape).values())
    dense_linears = sum(n * linears[k] for k, n in kinds.items())
    active = (dense_linears + kinds[True] * spec.experts_per_token * per_expert + norms + router_params(shape)
              + active_biases + embedding)
    return {"quantised_linears": dense_linears, "experts": experts, "unquantised": unquantised,
            "total": dense_linears + experts + unquantised, "active": active, "embedding": embedding}
