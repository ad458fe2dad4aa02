"""Peak memory of a QLoRA step on a mixture-of-experts model: the dense plan's items, expert-aware.

Notation as in `qlora.memory.plan`, plus E experts, k experts per token (top-k), m the expert MLP
width, s_w the shared-experts width, L_s the sparse layers. Weights:
    experts_4bit     L_s * E * (q(2m x h) + q(h x m))   each expert's 2-D matrix of both fused
                     parameters is its own 4-bit quantisation (bitsandbytes layout, q() as in
                     `quantised_tensor_bytes`: 4.127 bits/param for NF4 + double quant at block 64)
    weights_4bit     attention, dense-layer MLP and shared-expert linears, as in the dense plan
    routers          L_s * E * h in the compute dtype (fp32 for DeepSeek), never quantised
Expert LoRA (`lora.target_parameters`, PEFT's `target_parameters`): each targeted fused parameter
(E, out, in) gets lora_A (r*E, in) and lora_B (out, r*E), so r*E*(in + out) adapter weights in the
LoRA dtype, the same again in gradients, and the optimiser's states per tensor.

Activations, per token of one decoder layer (what autograd keeps; frozen 4-bit matmuls need no input):
    norms, attention, linear LoRA   as in the dense plan, with the attention widths of the model
                                    (DeepSeek's latent attention: q = k = heads x (nope + rope),
                                    v = out = heads x v_head) plus the fp32 upcast of the q/k or
                                    latent RMSNorms (4 x their width)
    router           c*E logits, fp32 softmax 4*E, int64 top-k indices 8*k, c*k routing weights
    routed experts   k x (3c*m + c*h): each token passes k experts; per pass the SwiGLU keeps the
                     fused gate/up output (2m) and the SiLU output (m), and the expert's output (h) is
                     kept for the routing-weight product. Expert LoRA adds, per pass and targeted
                     parameter, c*r of lora_A output and its input (the gathered hidden state c*h for
                     gate_up, the SwiGLU product c*m for down; each adapter its own dropped copy, plus
                     torch's 1-byte mask on CUDA, when lora.dropout > 0)
    shared experts   3c*s_w (+ c for Qwen2-MoE's sigmoid gate)
  so only the routed experts count: activations grow with tokens x k x m, never with E. Gradients
  in flight while a sparse layer runs backward: c*(2h + 3*s_w + k*(3m + 2h)) per token.
  router_logits: the (tokens x E) logits of every sparse layer, counted in fp32, stay alive to the
  loss for the load-balancing term (`output_router_logits`).

Attention: with unequal q/k and v head widths (DeepSeek's 192 / 128) torch's CPU SDPA falls back to
its math path, which keeps fp32 copies of q, k, v and the fp32 seq x seq probabilities:
4*(q + k + v) + 4*heads*seq per token (measured); CUDA's memory-efficient kernel takes unequal
widths and keeps what the dense plan counts. A family without an SDPA path in transformers (gpt-oss: attention sinks) is planned with
eager attention whatever `--attention` says (conservative where a flash-attention kernel with sinks
is installed).

Workspaces: the dense linears' dequantisation (2 x the largest linear, as in the dense plan) and the
routed-experts workspace: one expert matrix dequantised at a time in the compute dtype (the 4-bit
experts store decodes only experts that received tokens, one matrix after another). The routed
tokens' own activations are in the layer's set above.
"""

from __future__ import annotations

import dataclasses

from qlora.errors import UsageError
from qlora.memory.configs import ModelShape
from qlora.memory.moe_spec import (
    ALL_EXPERTS,
    expert_matrices,
    layer_linears,
    parameter_counts,
    router_params,
)
from qlora.memory.plan import (
    CUDA_OVERHEAD_BYTES,
    DTYPE_BYTES,
    GIB,
    MemoryPlan,
    PlanSettings,
    _optimizer_bytes,
    attention_mask_bytes,
    logits_loss_bytes,
    optimizer_state_bytes,
    quant_bits_per_param,
    quantised_tensor_bytes,
)

# Latent-attention linears and the planner target names (q/k/v/o) that select them.
LATENT_TARGETS = {"q_a_proj": ("q_proj",), "q_b_proj": ("q_proj",), "kv_a_proj_with_mqa": ("k_proj", "v_proj"),
                  "kv_b_proj": ("k_proj", "v_proj")}
# Linears that read one shared tensor (the normed hidden state): their adapters save it once.
SHARED_INPUTS = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"), "attention input"),
                 **dict.fromkeys(("gate_proj", "up_proj", "shared_expert_gate"), "mlp input")}


def expert_lora_targets(model: ModelShape, targets: tuple[str, ...]) -> list[tuple[int, str]]:
    """(layer, parameter) of every fused expert parameter that `lora.target_parameters` selects.

    An entry is `all-experts` or a parameter name / name suffix matched against the full names
    `model.layers.N.mlp.experts.gate_up_proj` (PEFT's suffix rule); one that matches nothing exits 2.
    """
    if not targets:
        return []
    if model.moe is None:
        raise UsageError(f"lora.target_parameters {list(targets)!r}: {model.name} is a dense model with no "
                         "fused expert parameters; expected [] (empty)")
    names = {(layer, p): f"model.layers.{layer}.{p}" for layer in model.moe.moe_layers for p in expert_matrices(model)}
    chosen = set()
    for entry in targets:
        hits = set(names) if entry == ALL_EXPERTS else {key for key, full in names.items()
                                                         if full == entry or full.endswith("." + entry)}
        if not hits:
            raise UsageError(f"lora.target_parameters entry {entry!r} matches no expert parameter of {model.name}; "
                             f"expected {ALL_EXPERTS!r} or a suffix of {', '.join(expert_matrices(model))}")
        chosen |= hits
    return sorted(chosen)


def _lora_targeted(name: str, s: PlanSettings) -> bool:
    leaf = name.rpartition(".")[2]
    return any(t in s.lora_targets for t in LATENT_TARGETS.get(leaf, (leaf,)))


def linear_lora_sizes(model: ModelShape, s: PlanSettings) -> list[int]:
    """Elements of every LoRA tensor on the model's linears (A then B of each targeted linear)."""
    sparse = set(model.moe.moe_layers)
    sizes = []
    for layer in range(model.num_hidden_layers):
        for name, (n_in, n_out) in layer_linears(model, layer in sparse).items():
            if _lora_targeted(name, s):
                sizes += [s.lora_r * n_in, n_out * s.lora_r]
    return sizes


def expert_lora_sizes(model: ModelShape, s: PlanSettings, targets: list[tuple[int, str]]) -> list[int]:
    """lora_A (r*E x in) and lora_B (out x r*E) elements of each targeted fused parameter."""
    rank = s.lora_r * model.moe.num_experts
    matrices = expert_matrices(model)
    return [n for _, p in targets for n in (rank * matrices[p][0], matrices[p][1] * rank)]


def _attention_bytes(model: ModelShape, s: PlanSettings) -> tuple[int, int]:
    """(per-token attention bytes, width of o_proj's saved input) as in the dense plan."""
    c, heads = DTYPE_BYTES[s.compute_dtype], model.num_attention_heads
    q, k, v, o = model.moe.attention_widths or (model.q_dim, model.kv_dim, model.kv_dim, model.q_dim)
    if s.attention == "sdpa" and s.device == "cpu" and k != v:  # torch's CPU math fallback, in fp32
        return 4 * (q + k + v) + 4 * heads * s.seq_len, o
    if s.attention == "sdpa":
        return c * (q + k + v) + c * o + 4 * heads, 0  # o_proj reads SDPA's saved output
    repeat = heads // model.num_key_value_heads
    return c * (q + repeat * (k + v)) + (4 + c) * heads * s.seq_len, o  # o_proj's input: only for its LoRA


def _linear_lora_bytes(model: ModelShape, s: PlanSettings, sparse: bool, o_input: int) -> int:
    """Per-token inputs and A outputs the LoRA adapters on one layer's linears keep."""
    c = DTYPE_BYTES[s.compute_dtype]
    mask = 1 if s.device == "cuda" else 0
    targeted = {n: w for n, w in layer_linears(model, sparse).items() if _lora_targeted(n, s)}
    inputs = {}
    for name, (n_in, _) in targeted.items():
        leaf = name.rpartition(".")[2]
        width = o_input if leaf == "o_proj" else n_in
        key = SHARED_INPUTS.get(leaf, name) if s.lora_dropout == 0 else name
        inputs[key] = (c + mask) * n_in if s.lora_dropout > 0 else c * width  # adapters on one tensor share it
    return sum(inputs.values()) + c * s.lora_r * len(targeted)


def experts_token_bytes(model: ModelShape, s: PlanSettings) -> int:
    """Per-token bytes of the router, the k routed expert passes and the shared experts (no LoRA)."""
    c, h, spec = DTYPE_BYTES[s.compute_dtype], model.hidden_size, model.moe
    m, k, experts = spec.moe_intermediate_size, spec.experts_per_token, spec.num_experts
    router = (4 if spec.router_fp32 else c) * experts + 4 * experts + (8 + c) * k
    shared = 3 * c * spec.shared_intermediate_size + (c if spec.shared_expert_gate else 0)
    return router + k * (3 * c * m + c * h) + shared


def expert_lora_token_bytes(model: ModelShape, s: PlanSettings, lora_params: set[str]) -> int:
    """Per-token lora_A outputs and inputs of the expert adapters in one layer, k passes each."""
    c, mask = DTYPE_BYTES[s.compute_dtype], 1 if s.device == "cuda" else 0
    inputs = [expert_matrices(model)[p][0] for p in lora_params]
    per_pass = sum(c * s.lora_r + ((c + mask) * n_in if s.lora_dropout > 0 else c * n_in) for n_in in inputs)
    return model.moe.experts_per_token * per_pass


def frozen_layer_token_bytes(model: ModelShape, s: PlanSettings, sparse: bool) -> tuple[int, int]:
    """(per-token bytes autograd keeps in one decoder layer without adapters, o_proj's input width)."""
    c, h = DTYPE_BYTES[s.compute_dtype], model.hidden_size
    norms = 2 * (4 * h + 4) + 4 * model.moe.norm_width
    attention, o_input = _attention_bytes(model, s)
    mlp = experts_token_bytes(model, s) if sparse else 3 * c * model.intermediate_size
    return norms + attention + mlp, o_input


def layer_token_bytes(model: ModelShape, s: PlanSettings, sparse: bool, lora_params: set[str]) -> int:
    """Bytes autograd keeps per token in one decoder layer with its adapters (module docstring)."""
    frozen, o_input = frozen_layer_token_bytes(model, s, sparse)
    experts = expert_lora_token_bytes(model, s, lora_params) if sparse else 0
    return frozen + experts + _linear_lora_bytes(model, s, sparse, o_input)


def layer_grad_token_bytes(model: ModelShape, s: PlanSettings, sparse: bool) -> int:
    """Per-token gradients in flight while one layer runs backward."""
    c, h, spec = DTYPE_BYTES[s.compute_dtype], model.hidden_size, model.moe
    if not sparse:
        return c * (3 * model.intermediate_size + 2 * h)
    routed = spec.experts_per_token * (3 * spec.moe_intermediate_size + 2 * h)
    return c * (2 * h + 3 * spec.shared_intermediate_size + routed)


def plan_moe(model: ModelShape, s: PlanSettings) -> MemoryPlan:
    """Itemised peak memory of one QLoRA step of a MoE `model` under `s` (module docstring)."""
    targets = expert_lora_targets(model, s.lora_target_parameters)
    if s.attention == "sdpa" and not model.moe.sdpa:
        s = dataclasses.replace(s, attention="eager")  # what transformers runs for it
    spec, c, lb, T = model.moe, DTYPE_BYTES[s.compute_dtype], DTYPE_BYTES[s.lora_dtype], s.tokens
    sparse = set(spec.moe_layers)
    per_layer = [layer_token_bytes(model, s, layer in sparse, {p for t, p in targets if t == layer})
                 for layer in range(model.num_hidden_layers)]
    grads = [layer_grad_token_bytes(model, s, layer in sparse) for layer in range(model.num_hidden_layers)]
    final_norm = T * (4 * model.hidden_size + 4)
    saved = {True: model.num_hidden_layers * c * T * model.hidden_size + final_norm, False: T * sum(per_layer) + final_norm}
    working = T * max(a * s.grad_checkpointing + g for a, g in zip(per_layer, grads))
    kept_logits = c * T * model.vocab_size if s.loss == "full" else 0
    logits = logits_loss_bytes(model, s)
    linear_sizes, expert_sizes = linear_lora_sizes(model, s), expert_lora_sizes(model, s, targets)
    counts = parameter_counts(model)
    router_dtype = "fp32" if spec.router_fp32 else s.compute_dtype
    expert_matrix = max(n_in * n_out for n_in, n_out in expert_matrices(model).values())
    linears = [w for layer in range(model.num_hidden_layers) for w in layer_linears(model, layer in sparse).values()]
    overhead = s.overhead_bytes if s.overhead_bytes is not None else (CUDA_OVERHEAD_BYTES if s.device == "cuda" else 0)
    ckpt = "checkpointing: each layer's input" if s.grad_checkpointing else "no checkpointing: every layer's saved set"
    expert_note = (f"r={s.lora_r} x {spec.num_experts} experts on {len(targets)} fused parameters"
                   if targets else "no lora.target_parameters")
    items = {
        "weights_4bit": (sum(quantised_tensor_bytes(i * o, s.blocksize, s.double_quant) for i, o in linears),
                         f"attention, dense and shared-expert linears in {s.quant_type}"
                         f"{' + double quant' if s.double_quant else ''}"),
        "experts_4bit": (len(sparse) * spec.num_experts * sum(quantised_tensor_bytes(i * o, s.blocksize, s.double_quant)
                                                                for i, o in expert_matrices(model).values()),
                         f"{spec.num_experts} experts x {len(sparse)} layers, each expert matrix its own {s.quant_type} "
                         f"quantisation: {quant_bits_per_param(s.blocksize, s.double_quant):.3f} bits/param"),
        "weights_unquantised": (c * (counts["unquantised"] - router_params(model)),
                                f"embeddings{'' if model.tie_word_embeddings else ', lm_head'}, norms, biases in {s.compute_dtype}"),
        "routers": (DTYPE_BYTES[router_dtype] * router_params(model), f"{len(sparse)} routers ({spec.num_experts} x hidden) "
                    f"in {router_dtype}, frozen"),
        "lora_params": (lb * sum(linear_sizes), f"r={s.lora_r} on the targeted linears, {s.lora_dtype}"),
        "lora_grads": (lb * sum(linear_sizes), f"same dtype as the adapters ({s.lora_dtype})"),
        "optimizer_states": (_optimizer_bytes(linear_sizes, s), f"{s.optimizer}, 2 states per linear LoRA param"),
        "expert_lora_params": (lb * sum(expert_sizes), expert_note),
        "expert_lora_grads": (lb * sum(expert_sizes), f"same dtype as the adapters ({s.lora_dtype})"),
        "expert_lora_optimizer": (sum(optimizer_state_bytes(n, s.optimizer, lb) for n in expert_sizes),
                                  f"{s.optimizer} states of the expert adapters"),
        **({"adalora_scores": (8 * (sum(linear_sizes) + sum(expert_sizes)), "AdaLoRA: 2 fp32 averages per adapter weight")}
           if s.adalora else {}),
        "activations": (saved[s.grad_checkpointing], f"{ckpt}, {s.attention} attention"
                        + ("" if spec.sdpa else " (the family has no SDPA path in transformers)")),
        "router_logits": (len(sparse) * T * spec.num_experts * 4, "tokens x experts fp32 logits of every sparse "
                          "layer, kept for the load-balancing loss"),
        "attention_mask": (attention_mask_bytes(s), f"b x s x s {s.attention} mask kept for the recomputation"),
        "logits_and_loss": (logits, f"{s.compute_dtype} logits + fp32 log-softmax + fp32 grads"
                            + ("" if s.loss == "full" else f", {s.loss_chunk}-token chunks")),
        "layer_backward": (max(0, working + kept_logits - logits),
                           f"{'recomputed layer + ' if s.grad_checkpointing else ''}gradients in flight, routed tokens "
                           f"x top-{spec.experts_per_token} ({(working + kept_logits) / GIB:.3f} GiB) beyond the logits peak"),
        "dequant_workspace": (2 * c * max(i * o for i, o in linears), f"2 x largest dequantised linear in {s.compute_dtype}"),
        "expert_workspace": (c * expert_matrix, f"one dequantised expert matrix in {s.compute_dtype} (routed experts "
                             "are decoded one at a time)"),
        "framework_overhead": (overhead, "CUDA context, kernels, cuBLAS workspace" if s.device == "cuda"
                               else "none counted on CPU (tensor accounting)"),
    }
    details = {
        "parameters": counts["total"], "active_parameters": counts["active"],
        "quantised_parameters": counts["quantised_linears"] + counts["experts"], "expert_parameters": counts["experts"],
        "unquantised_parameters": counts["unquantised"],
        "lora_parameters": sum(linear_sizes) + sum(expert_sizes), "expert_lora_parameters": sum(expert_sizes),
        "routed_token_passes": T * spec.experts_per_token,
        "layer_activation_bytes": T * max(per_layer),
        "activations_with_checkpointing_bytes": saved[True] + T * max(per_layer),
        "activations_without_checkpointing_bytes": saved[False],
    }
    return MemoryPlan(model=model, settings=s, breakdown={k: v for k, (v, _) in items.items()},
                      notes={k: note for k, (_, note) in items.items()}, details=details)
