"""Peak-memory arithmetic for QLoRA training of a LLaMA-style decoder.

Every figure is bytes, for one training step at the peak (the start of the backward pass, when the
forward's saved tensors, the loss and the logits' gradient are all alive). Notation: T = micro-batch
x sequence tokens, h hidden, i MLP size, q/kv the query and key/value widths, V vocabulary, L layers,
r the LoRA rank, c the compute dtype's bytes (2 for bf16/fp16, 4 for fp32).

4-bit weights (bitsandbytes layout, per tensor of n elements, block B):
    packed codes        ceil(n/2)                          two 4-bit codes per byte
    with double quant   ceil(n/B)  uint8 absmax            (absmax - offset) in 8 bits
                        4*ceil(ceil(n/B)/256)              fp32 absmax of each 256 absmax
                        4 + 256*4                          fp32 offset, 8-bit dynamic map
    without             4*ceil(n/B)                        fp32 absmax
    always              16*4                               the 4-bit code table
  so NF4+DQ at B=64 costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter. All decoder linear
  layers are quantised (whatever LoRA targets); embeddings, lm_head, norms and biases stay in c bytes.

LoRA: each targeted linear (n_in -> n_out) adds A (r x n_in) and B (n_out x r) in the LoRA dtype;
their gradients have the same dtype. Optimiser states per tensor: bitsandbytes 8-bit Adam keeps two
uint8 states plus one fp32 absmax per 256-element block for each state, but plain fp32 states for
tensors under 4,096 elements; 32-bit bitsandbytes Adam keeps two fp32 states; qlora's AdamW keeps two
fp32 states whatever the adapters' dtype plus a float64 step. Paged optimisers may evict states to host memory
under pressure; the plan counts them resident (the conservative case).

Activations: the tensors autograd saves in one decoder layer of transformers' LlamaDecoderLayer
with frozen 4-bit linears (whose backward needs only the packed weight, never their input), per token:
    2 RMSNorms       2*(4h + 4)        the fp32 upcast of the input and the rsqrt per row
    attention SDPA   c*(q + 2kv) + c*q + 4*heads   rotated q, k, v (GQA unrepeated), output and the
                                                   fp32 log-sum-exp; no T x T scores (flash/efficient
                                                   kernels recompute them); o_proj reads the output
                                                   buffer itself, so its LoRA input is free
    attention eager  3c*q + (4 + c)*heads*seq + c*q  q and k, v repeated to all heads, the fp32 softmax
                                                   and its c-byte copy (b*heads*s^2 each), and the
                                                   contiguous copy o_proj's LoRA reads
    SwiGLU MLP       3c*i              gate output (for SiLU), SiLU output and up output (for the mul)
    LoRA inputs      c per distinct input read by an adapter without dropout (the q/k/v adapters
                     share the normed input; down_proj's input i wide is saved only if targeted);
                     with dropout p > 0 each adapter saves its own dropped input (c*n_in); on CUDA
                     torch's dropout also keeps a 1-byte mask per element, on the CPU qlora's hashed
                     mask is recomputed from a seed (qlora.nn.dropout) and costs nothing
    LoRA A outputs   c*r per adapter (saved for B's gradient)
  Without gradient checkpointing all L layers keep these. With checkpointing each layer keeps only its
  input (c*h per token) and the backward recomputes one layer at a time, so one layer's set is alive.
  The final norm keeps 4h + 4 per token either way. While one layer runs backward its gradients
  are in flight: about c*(3i + 2h) per token (three MLP-wide gradients, the residual gradient and
  the one being accumulated).

Logits and loss (transformers' ForCausalLMLoss): c*T*V logits (the caller keeps them), a transient fp32
upcast, log-softmax output saved in fp32, then in backward its fp32 gradient and the fp32 gradient of
the upcast: (c + 12)*T*V at the peak. With `loss="chunked"` (qlora.nn.loss.CausalLMLoss: only target
positions, each chunk under activation checkpointing, no logits returned to the caller) the forward
keeps the N = b*(s-1) target positions' hidden states (c*h each) and their int64 indices (8 each),
and the backward recomputes one chunk of n = min(chunk, N) tokens: the fp32 log-softmax output, its
fp32 gradient and the fp32 gradient of the upcast are alive together, 12*n*V; the c-byte logits
live only inside the recomputation, beside the fp32 upcast (6*n*V), so they never set the peak.

Attention mask: transformers builds one b x 1 x s x s mask per forward, shared by all layers, for
eager attention (in c bytes), and for SDPA (booleans) when rows are packed (`packed`: the
block-diagonal mask of `qlora.data.batching.pack`) or right-padded (micro_batch > 1); a lone
unpadded row runs SDPA's causal kernel with no mask, and flash attention's varlen path needs none.
No layer saves it for backward (measured), but checkpointed layers keep it as an input for their
recomputation, so with checkpointing it is alive at the peak: b*s^2 bytes (SDPA) or c*b*s^2 (eager).

Dequantisation workspace: a 4-bit linear dequantises its weight to c bytes for each matmul; with the
caching allocator the previous buffer is still held while the next is filled, so 2 x the largest
linear weight.

Framework overhead: on CUDA 1 GiB for the CUDA context, kernels and cuBLAS workspaces (the context
alone is ~0.5-1 GB depending on GPU and lazy loading); on CPU nothing, because the CPU profiler counts
tensors (add the interpreter's import baseline yourself when comparing with process RSS). Allocator
fragmentation is not modelled: that is what the margin is for.

Peak, not sum: the backward first runs through the loss (logits peak), then through the layers one
at a time (the recomputed layer, with checkpointing, and its gradients). These are never alive together,
so the plan counts max(logits peak, layer working set): the "layer_backward" item is the excess of the
layer working set (which includes the c*T*V logits the caller still holds) over "logits_and_loss"
(often 0). The items then sum to the peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from qlora.choices import BLOCKSIZES, OPTIMIZERS, QUANT_TYPES
from qlora.errors import UsageError
from qlora.memory.configs import LINEAR_NAMES, ModelShape

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION = ("sdpa", "eager")
LOSSES = ("full", "chunked")
DEVICES = ("cuda", "cpu")
CUDA_OVERHEAD_BYTES = 1 * GIB

OPTIM_BLOCK = 256          # bitsandbytes 8-bit optimiser block size
OPTIM_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 states below this many elements
NESTED_BLOCK = 256          # double-quant block size over the absmax values


@dataclass(frozen=True)
class PlanSettings:
    """Recipe settings that change the memory of a QLoRA step."""

    lora_r: int = 64
    lora_targets: tuple[str, ...] = LINEAR_NAMES
    """Linear layers that get adapters; default all seven ("all-linear")."""
    lora_target_parameters: tuple[str, ...] = ()
    """Fused 3-D expert parameters with LoRA (`lora.target_parameters`; `qlora.memory.moe`)."""
    lora_dropout: float = 0.0
    lora_dtype: str = "bf16"
    adalora: bool = False
    """AdaLoRA: two fp32 score averages (sensitivity, uncertainty) per adapter weight."""
    seq_len: int = 512
    micro_batch: int = 1
    grad_checkpointing: bool = True
    offload_activations: bool = False
    """Checkpointed layers' inputs wait in host memory (`train.offload_activations`): two stay on the GPU."""
    optimizer: str = "paged_adamw_8bit"
    compute_dtype: str = "bf16"
    quant_type: str = "nf4"
    """nf4/fp4/int4 all store 4-bit codes and a 16-entry table: identical sizes."""
    blocksize: int = 64
    double_quant: bool = True
    attention: str = "sdpa"
    """"sdpa" (flash/memory-efficient kernels, no T x T scores kept) or "eager"."""
    packed: bool = False
    """Rows packed with per-document positions (`data.packing`): SDPA then gets a block-diagonal mask."""
    loss: str = "chunked"
    """"chunked" (`qlora.nn.loss.CausalLMLoss`, the trainer's default) or "full" logits at once."""
    loss_chunk: int = 1024
    """Tokens per chunk when loss="chunked"."""
    target_tokens: int | None = None
    """Tokens per micro-batch that carry a label, for loss="chunked" (which computes logits for them
    only); None means all of them: micro_batch * (seq_len - 1). Prompt masking makes it smaller."""
    device: str = "cuda"
    overhead_bytes: int | None = None
    """Framework overhead; None means 1 GiB on CUDA and 0 on CPU."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "lora_target_parameters", tuple(self.lora_target_parameters))
        for name in ("lora_r", "seq_len", "micro_batch", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise UsageError(f"lora_targets {list(self.lora_targets)!r} must be distinct names "
                             f"from {', '.join(LINEAR_NAMES)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check_choice("lora_dtype", self.lora_dtype, tuple(DTYPE_BYTES))
        _check_choice("compute_dtype", self.compute_dtype, tuple(DTYPE_BYTES))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("quant_type", self.quant_type, QUANT_TYPES)
        _check_choice("blocksize", self.blocksize, BLOCKSIZES)
        _check_choice("attention", self.attention, ATTENTION)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("device", self.device, DEVICES)
        if self.target_tokens is not None and (isinstance(self.target_tokens, bool) or not isinstance(self.target_tokens, int)
                                               or not 0 <= self.target_tokens <= self.micro_batch * self.seq_len):
            raise UsageError(f"target_tokens must be an integer from 0 to micro_batch * seq_len, got {self.target_tokens!r}")
        if self.overhead_bytes is not None and (not isinstance(self.overhead_bytes, int) or self.overhead_bytes < 0):
            raise UsageError(f"overhead_bytes must be a non-negative integer, got {self.overhead_bytes!r}")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UsageError(f"{name} {value!r} is not supported; choose one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class MemoryPlan:
    """Peak bytes of one training step, itemised; `breakdown` sums to `total_bytes`."""

    model: ModelShape
    settings: PlanSettings
    breakdown: dict[str, int]
    notes: dict[str, str]
    """One line per breakdown item: what it holds."""
    details: dict[str, int] = field(default_factory=dict)
    """Counts behind the figures (parameters, per-layer activations, both checkpointing modes)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.breakdown.values())

    def fits(self, gpu_bytes: int) -> bool:
        return self.total_bytes <= gpu_bytes

    def margin_bytes(self, gpu_bytes: int) -> int:
        return gpu_bytes - self.total_bytes

    def to_dict(self, gpu_bytes: int | None = None) -> dict:
        out = {"model": asdict(self.model), "settings": asdict(self.settings),
               "breakdown_bytes": dict(self.breakdown), "notes": dict(self.notes),
               "details": dict(self.details), "total_bytes": self.total_bytes}
        if gpu_bytes is not None:
            out.update(gpu_bytes=gpu_bytes, fits=self.fits(gpu_bytes), margin_bytes=self.margin_bytes(gpu_bytes))
        return out


# ---------------------------------------------------------------------------------------------
# Weights


def quantised_tensor_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one 4-bit tensor of n elements with all its quantisation constants."""
    blocks = math.ceil(n / blocksize)
    packed = (n + 1) // 2
    code_table = 16 * 4
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 256 * 4
    else:
        constants = 4 * blocks
    return packed + code_table + constants


def quant_bits_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per parameter of 4-bit storage for large tensors (per-tensor constants vanish)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCK)
    return 4 + 32 / blocksize


def _weights_4bit(model: ModelShape, s: PlanSettings) -> int:
    per_layer = sum(quantised_tensor_bytes(n_in * n_out, s.blocksize, s.double_quant)
                    for n_in, n_out in model.linear_shapes().values())
    return per_layer * model.num_hidden_layers


# ---------------------------------------------------------------------------------------------
# LoRA parameters, gradients, optimiser states


def lora_tensor_sizes(model: ModelShape, s: PlanSettings) -> list[int]:
    """Elements of every LoRA tensor in the model (A then B of each targeted linear)."""
    shapes = model.linear_shapes()
    per_layer = []
    for name in s.lora_targets:
        n_in, n_out = shapes[name]
        per_layer += [s.lora_r * n_in, n_out * s.lora_r]
    return per_layer * model.num_hidden_layers


def optimizer_state_bytes(numel: int, optimizer: str, param_bytes: int) -> int:
    """Adam state bytes for one parameter tensor (see the module docstring)."""
    if optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        if numel < OPTIM_MIN_8BIT_SIZE:
            return 2 * 4 * numel
        return 2 * (numel + 4 * math.ceil(numel / OPTIM_BLOCK))
    if optimizer == "paged_adamw_32bit":
        return 2 * 4 * numel
    if optimizer == "adamw":  # qlora's AdamW: fp32 moments whatever the adapter dtype, a float64 step
        return 2 * 4 * numel + 8
    raise UsageError(f"optimizer {optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


def _optimizer_bytes(sizes: list[int], s: PlanSettings) -> int:
    shared_maps = 2 * 256 * 4 if s.optimizer.endswith("8bit") else 0  # signed + unsigned dynamic maps
    return shared_maps + sum(optimizer_state_bytes(n, s.optimizer, DTYPE_BYTES[s.lora_dtype]) for n in sizes)


# ---------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(model: ModelShape, s: PlanSettings) -> int:
    """Bytes autograd saves in one decoder layer for the whole micro-batch (module docstring)."""
    c, T = DTYPE_BYTES[s.compute_dtype], s.tokens
    h, i, q, kv = model.hidden_size, model.intermediate_size, model.q_dim, model.kv_dim
    heads = model.num_attention_heads
    norms = 2 * (4 * h + 4)
    if s.attention == "sdpa":
        attention = c * (q + 2 * kv) + c * q + 4 * heads
        o_input = 0  # o_proj reads SDPA's saved output buffer
    else:
        attention = 3 * c * q + (4 + c) * heads * s.seq_len
        o_input = q
    mlp = 3 * c * i
    lora_hidden = c * s.lora_r * len(s.lora_targets)
    return T * (norms + attention + mlp + lora_hidden + _lora_input_bytes(model, s, o_input))


def _lora_input_bytes(model: ModelShape, s: PlanSettings, o_input: int) -> int:
    """Per-token bytes of the inputs the LoRA A matrices keep for their gradient."""
    c = DTYPE_BYTES[s.compute_dtype]
    if s.lora_dropout > 0:  # each adapter drops its own copy (and on CUDA keeps torch's mask)
        mask = 1 if s.device == "cuda" else 0
        return sum((c + mask) * model.linear_shapes()[t][0] for t in s.lora_targets)
    h, i = model.hidden_size, model.intermediate_size
    reads = {"q_proj": ("attn_in", h), "k_proj": ("attn_in", h), "v_proj": ("attn_in", h),
             "o_proj": ("o_in", o_input), "gate_proj": ("mlp_in", h), "up_proj": ("mlp_in", h),
             "down_proj": ("down_in", i)}  # adapters reading the same tensor save it once
    return c * sum(dict(reads[t] for t in s.lora_targets).values())


def saved_activation_bytes(model: ModelShape, s: PlanSettings, grad_checkpointing: bool) -> int:
    """Activations alive through the whole backward: checkpointed layer inputs, or every layer's set."""
    c, T, h = DTYPE_BYTES[s.compute_dtype], s.tokens, model.hidden_size
    final_norm = T * (4 * h + 4)
    if grad_checkpointing:  # with offloading: the input being restored and the one in use
        layers = min(2, model.num_hidden_layers) if s.offload_activations else model.num_hidden_layers
        return layers * c * T * h + final_norm
    return model.num_hidden_layers * layer_activation_bytes(model, s) + final_norm


def activation_bytes(model: ModelShape, s: PlanSettings, grad_checkpointing: bool) -> int:
    """Peak activations: the saved ones plus, with checkpointing, one recomputed layer."""
    recomputed = layer_activation_bytes(model, s) if grad_checkpointing else 0
    return saved_activation_bytes(model, s, grad_checkpointing) + recomputed


def attention_mask_bytes(s: PlanSettings) -> int:
    """The b x 1 x s x s mask alive at the peak (module docstring): only checkpointed layers keep it."""
    if not s.grad_checkpointing:
        return 0
    if s.attention == "eager":
        return DTYPE_BYTES[s.compute_dtype] * s.micro_batch * s.seq_len ** 2
    return s.micro_batch * s.seq_len ** 2 if s.packed or s.micro_batch > 1 else 0


def activation_grad_bytes(model: ModelShape, s: PlanSettings) -> int:
    c = DTYPE_BYTES[s.compute_dtype]
    return c * s.tokens * (3 * model.intermediate_size + 2 * model.hidden_size)


def logits_loss_bytes(model: ModelShape, s: PlanSettings) -> int:
    c = DTYPE_BYTES[s.compute_dtype]
    if s.loss == "full":
        return (c + 12) * s.tokens * model.vocab_size
    targets = s.micro_batch * (s.seq_len - 1) if s.target_tokens is None else s.target_tokens  # t predicts t+1
    return 12 * min(s.loss_chunk, targets) * model.vocab_size + targets * (c * model.hidden_size + 8)


# ---------------------------------------------------------------------------------------------
# The plan


def plan_dense(model: ModelShape, s: PlanSettings) -> MemoryPlan:
    """Itemised peak memory of one QLoRA training step of a dense `model` under `s`
    (`qlora.memory.planner.plan_memory` picks this or the mixture-of-experts plan)."""
    c, lora_bytes = DTYPE_BYTES[s.compute_dtype], DTYPE_BYTES[s.lora_dtype]
    lora_sizes = lora_tensor_sizes(model, s)
    lora_params = sum(lora_sizes)
    largest_linear = max(n_in * n_out for n_in, n_out in model.linear_shapes().values())
    overhead = s.overhead_bytes if s.overhead_bytes is not None else (CUDA_OVERHEAD_BYTES if s.device == "cuda" else 0)
    ckpt = "checkpointing: each layer's input" if s.grad_checkpointing else "no checkpointing: every layer's saved set"
    logits = logits_loss_bytes(model, s)
    recomputed = layer_activation_bytes(model, s) if s.grad_checkpointing else 0
    kept_logits = c * s.tokens * model.vocab_size if s.loss == "full" else 0  # the caller holds them
    layer_working = recomputed + activation_grad_bytes(model, s) + kept_logits

    items = {
        "weights_4bit": (_weights_4bit(model, s),
                         f"{s.quant_type} blocksize {s.blocksize}{' + double quant' if s.double_quant else ''}: "
                         f"{quant_bits_per_param(s.blocksize, s.double_quant):.3f} bits/param"),
        "weights_unquantised": (c * model.unquantised_params(),
                                f"embeddings{'' if model.tie_word_embeddings else ', lm_head'}, norms, biases in {s.compute_dtype}"),
        "lora_params": (lora_bytes * lora_params, f"r={s.lora_r} on {len(s.lora_targets)} linears/layer, {s.lora_dtype}"),
        "lora_grads": (lora_bytes * lora_params, f"same dtype as the adapters ({s.lora_dtype})"),
        "optimizer_states": (_optimizer_bytes(lora_sizes, s), f"{s.optimizer}, 2 states per LoRA param"),
        **({"adalora_scores": (2 * 4 * lora_params, "AdaLoRA: 2 fp32 averages of |w * grad| per adapter weight")}
           if s.adalora else {}),
        "activations": (saved_activation_bytes(model, s, s.grad_checkpointing), f"{ckpt}, {s.attention} attention"),
        "attention_mask": (attention_mask_bytes(s), f"b x s x s {'packed ' if s.packed else ''}{s.attention} mask "
                           "kept for the checkpointed layers' recomputation"),
        "logits_and_loss": (logits, f"{s.compute_dtype} logits + fp32 log-softmax + fp32 grads"
                            + ("" if s.loss == "full" else f", {s.loss_chunk}-token chunks")),
        "layer_backward": (max(0, layer_working - logits),
                           f"{'recomputed layer + ' if s.grad_checkpointing else ''}gradients in flight + kept logits "
                           f"({layer_working / GIB:.3f} GiB) beyond the logits peak: never alive together"),
        "dequant_workspace": (2 * c * largest_linear, f"2 x largest dequantised weight in {s.compute_dtype}"),
        "framework_overhead": (overhead, "CUDA context, kernels, cuBLAS workspace" if s.device == "cuda"
                               else "none counted on CPU (tensor accounting)"),
    }
    details = {
        "parameters": model.num_parameters(),
        "quantised_parameters": model.linear_weight_params(),
        "unquantised_parameters": model.unquantised_params(),
        "lora_parameters": lora_params,
        "layer_activation_bytes": layer_activation_bytes(model, s),
        "activations_with_checkpointing_bytes": activation_bytes(model, s, True),
        "activations_without_checkpointing_bytes": activation_bytes(model, s, False),
    }
    return MemoryPlan(model=model, settings=s, breakdown={k: v for k, (v, _) in items.items()},
                      notes={k: note for k, (_, note) in items.items()}, details=details)
