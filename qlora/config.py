"""Training recipes as typed dataclasses: one section per concern (`model`, `quant`, `lora`,
`data`, `optim`, `train`, `output`).

Every section's field annotations are the schema: each `__post_init__` checks the value types
(int, float, bool, str, Literal choices, lists, Optional) and the ranges, so a config built in
Python is checked exactly like one read from YAML (`qlora.recipe` reads and writes the files).
Every mistake is a `UsageError` that names the full key (`lora.r`), the value, and what is allowed.
The `data` section lives in `qlora.config_data` (re-exported here). Sections hand out the values the rest of qlora carries: `QuantConfig.format()` a `QuantFormat`,
`LoraConfig.spec()` a `LoraSpec`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union


from qlora import choices
from qlora.config_data import DataConfig
from qlora.config_preference import OBJECTIVES, PreferenceConfig, check_recipe
from qlora.errors import UsageError
from qlora.typecheck import Section

if typing.TYPE_CHECKING:
    from qlora.adapters.spec import LoraSpec
    from qlora.quant.format import QuantFormat

Dtype = Literal[choices.DTYPES]

# Upper limits: far beyond any real run, low enough that a typo fails here with the limit named
# instead of as a multi-terabyte allocation or an integer overflow deep inside torch.
MAX_COUNT = 10**9  # steps, epochs, intervals
MAX_RANK = 8192  # LoRA rank: the hidden size of the largest models this tool targets
MAX_BATCH = 65_536  # examples per micro-batch, micro-batches per step
MAX_THREADS = 4096
MAX_SEED = 2**32 - 1  # numpy's (and so datasets') seed range


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig(Section):
    section: ClassVar[str] = "model"

    name_or_path: str = "smollm2-135m"
    """A local Hugging Face model folder, a hub id (when online), or a built-in name:
    `smollm2-135m` (the embedded SmolLM2-135M-Instruct) or `tiny-llama` (random, for tests)."""
    trust_remote_code: bool = False
    """Allow model code from the model folder. Off: only architectures transformers ships run."""
    dtype: Dtype = "bf16"
    """Compute dtype of the frozen base model (activations, dequantised weights)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    adapter: Optional[str] = None
    """Start from this PEFT LoRA adapter folder (e.g. an SFT run's `adapter/`): the run trains a copy
    (lora.r / alpha / targets must describe it). With a preference objective the frozen original is
    the reference policy. Null: fresh adapters, and the base alone is the reference."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(bool(self.name_or_path.strip()), "name_or_path", "give a model folder or name")


@dataclass
class QuantConfig(Section):
    section: ClassVar[str] = "quant"

    enabled: bool = True
    """Quantise the frozen base linears to 4 bits (QLoRA). Off: 16-bit LoRA on the same recipe."""
    quant_type: Literal[choices.QUANT_TYPES] = "nf4"
    """4-bit code book: NormalFloat4 (the paper's), FP4 (E2M1) or symmetric Int4."""
    blocksize: int = 64
    """Weights per absmax scale: a power of two from 32 to 4096."""
    double_quant: bool = True
    """Quantise the fp32 absmax scales to 8 bits as well (saves ~0.37 bits/param at blocksize 64)."""
    quant_storage: Literal[choices.QUANT_STORAGE] = "uint8"
    """Storage dtype of the packed weight: bf16 lets FSDP shard it next to bf16 parameters."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Linear modules (by name or name suffix) kept in 16 bits."""

    def __post_init__(self) -> None:
        self._check_types()
        b = self.blocksize
        self._require(b in choices.BLOCKSIZES, "blocksize", "expected a power of two from 32 to 4096")

    def format(self, compute_dtype: str) -> "QuantFormat":
        """The 4-bit format these settings describe, computed in `compute_dtype` (a short name)."""
        import torch

        from qlora.dtypes import torch_dtype
        from qlora.quant.format import QuantFormat

        storage = torch.bfloat16 if self.quant_storage == "bf16" else torch.uint8
        return QuantFormat(self.quant_type, self.blocksize, self.double_quant, storage, torch_dtype(compute_dtype))


@dataclass
class LoraConfig(Section):
    section: ClassVar[str] = "lora"

    r: int = 16
    """Rank of the update B @ A."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input, in [0, 1)."""
    targets: Union[str, list[str]] = "all-linear"
    """Which linears get adapters: `all-linear` (every linear but the skipped ones), a list of
    module names or name suffixes (`[q_proj, v_proj]`), or a regex over full names prefixed
    `re:` (`re:.*\\.(q|v)_proj`)."""
    target_parameters: Union[str, list[str]] = field(default_factory=list)
    """Mixture-of-experts: fused 3-D expert parameters that get LoRA (PEFT's `target_parameters`):
    `all-experts` (every one) or parameter names / name suffixes (`[mlp.experts.gate_up_proj,
    mlp.experts.down_proj]`). Each (experts, out, in) parameter gets lora_A (r*experts, in) and
    lora_B (out, r*experts). Empty: no expert LoRA. Expert LoRA takes no dropout (set
    `dropout: 0`), as in PEFT."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dtype: Dtype = "bf16"
    """Dtype of the trainable A and B matrices."""
    use_dora: bool = False
    """DoRA: learn a per-output-row magnitude as well (PEFT's `use_dora`; ~1 dequantisation more
    per layer and step)."""
    init: Literal[choices.LORA_INITS] = "default"
    """Adapter start: `default` (B = 0), `loftq` (A, B fit the quantisation error of W, so
    dequant(Q) + s B A is closer to W) or `pissa` (A, B hold W's top-r singular directions; the
    4-bit base is the residual W - s B A). Computed per layer while loading (needs quant.enabled);
    when the base changes (pissa, loftq with loftq_iters > 1) it is saved in the run's `base/`."""
    loftq_iters: int = 1
    """LoftQ alternations of quantise / low-rank fit; 1 keeps the standard 4-bit base."""
    use_adalora: bool = False
    """AdaLoRA: SVD-form adapters (A, E, B) whose ranks move between layers during training, from
    `r` (PEFT's init_r) per layer to `target_r` on average; saved as PEFT's ADALORA adapter."""
    target_r: int = 8
    """AdaLoRA: the average rank per layer at the end of the budget schedule (<= r)."""
    tinit: int = 0
    """AdaLoRA: optimiser steps at the full budget before ranks start to fall."""
    tfinal: int = 0
    """AdaLoRA: final optimiser steps at the target budget with the rank pattern fixed."""
    delta_t: int = 1
    """AdaLoRA: mask to the current budget every delta_t steps (PEFT's deltaT)."""
    beta1: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity |w * grad| of each adapter weight."""
    beta2: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity's uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality penalty ||A A^T - I|| + ||B^T B - I|| in the loss."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require_range("r", 1, MAX_RANK, "a rank above the hidden size adds nothing")
        self._require(self.alpha > 0, "alpha", "expected a number > 0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "expected a number in [0, 1)")
        self._require_range("loftq_iters", 1, 100)
        self._require_range("target_r", 1, MAX_RANK)
        for name in ("tinit", "tfinal"):
            self._require_range(name, 0, MAX_COUNT)
        self._require_range("delta_t", 1, MAX_COUNT)
        for name in ("beta1", "beta2"):
            self._require(0.0 < getattr(self, name) < 1.0, name, "expected a number in (0, 1)")
        self._require(self.orth_reg_weight >= 0, "orth_reg_weight", "expected a number >= 0")
        if self.use_adalora:
            self._check_adalora()
        if isinstance(self.targets, list):
            self._require(bool(self.targets) and all(t.strip() for t in self.targets), "targets",
                          "expected a non-empty list of module names")
        else:
            self._require(self.targets == "all-linear" or self.targets.startswith("re:"), "targets",
                          "expected 'all-linear', a list of module names, or 're:<regex>'")
        self._require(self.target_parameters == "all-experts" if isinstance(self.target_parameters, str)
                      else all(t.strip() for t in self.target_parameters), "target_parameters",
                      "expected 'all-experts' or a list of expert parameter names (mlp.experts.gate_up_proj, ...)")
        self._require(not self.target_parameters or self.dropout == 0, "dropout",
                      "must be 0 with lora.target_parameters (expert LoRA, as PEFT's ParamWrapper, has no dropout)")

    def _check_adalora(self) -> None:
        self._require(self.target_r <= self.r, "target_r", f"AdaLoRA's target rank must be <= lora.r "
                      f"(its initial rank), {self.r}")
        for name, allowed in (("use_dora", False), ("use_rslora", False), ("init", "default")):
            self._require(getattr(self, name) == allowed, name, f"expected {allowed!r} with lora.use_adalora "
                          "(AdaLoRA has its own init and scaling, as in PEFT)")

    def spec(self) -> "LoraSpec":
        """The adapter these settings describe (what surgery, checkpoints and the PEFT writer use)."""
        from qlora.adapters.spec import AdaLoraSchedule, LoraSpec

        adalora = AdaLoraSchedule(self.target_r, self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2,
                                  self.orth_reg_weight) if self.use_adalora else None
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                        use_rslora=self.use_rslora, dtype=self.dtype, use_dora=self.use_dora,
                        init=self.init, loftq_iters=self.loftq_iters, adalora=adalora,
                        target_parameters=self.target_parameters)


@dataclass
class OptimConfig(Section):
    section: ClassVar[str] = "optim"

    name: Literal[choices.OPTIMIZERS] = "paged_adamw_8bit"
    """bitsandbytes paged 8-bit AdamW (paging needs CUDA; on CPU it runs un-paged), 8-bit AdamW,
    paged 32-bit AdamW, or qlora's AdamW (adamw: fp32 moments for bf16 adapters, needs no bitsandbytes)."""
    lr: float = 2e-4
    """Peak learning rate."""
    lora_plus_ratio: float = 1.0
    """LoRA+: the B matrices learn at lr * ratio (the LoRA+ paper suggests 2-16); 1.0 is plain LoRA."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to LoRA matrices only."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon, added to the root of the second moment for numerical stability."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this; null or 0 disables clipping."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape after warmup: cosine or linear decay to min_lr_ratio * lr, or constant."""
    warmup_steps: int = 0
    """Linear warmup steps (set this or warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total optimiser steps (set this or warmup_steps)."""
    min_lr_ratio: float = 0.0
    """Final lr of the cosine / linear decay as a fraction of lr."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(self.lr > 0, "lr", "expected a number > 0")
        self._require(self.lora_plus_ratio > 0, "lora_plus_ratio", "expected a number > 0 (1.0 = off)")
        self._require(self.weight_decay >= 0, "weight_decay", "expected a number >= 0")
        self._require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "expected two numbers in [0, 1)")
        self._require(self.eps > 0, "eps", "expected a number > 0")
        self._require(self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm",
                      "expected a number >= 0 or null")
        self._require_range("warmup_steps", 0, MAX_COUNT)
        self._require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "expected a number in [0, 1)")
        self._require(not (self.warmup_steps and self.warmup_ratio), "warmup_steps",
                      "set warmup_steps or warmup_ratio, not both")
        self._require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "expected a number in [0, 1]")


@dataclass
class TrainConfig(Section):
    section: ClassVar[str] = "train"

    micro_batch_size: int = 4
    """Examples per forward / backward pass (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step."""
    max_steps: Optional[int] = None
    """Optimiser steps to run; when null, run `epochs` passes over the training data."""
    epochs: Optional[int] = 1
    """Passes over the training data, used when max_steps is null."""
    gradient_checkpointing: bool = True
    """Recompute decoder-layer activations in backward (less memory, ~30% more compute)."""
    offload_activations: bool = False
    """Keep each checkpointed layer's saved input in pinned host memory until its backward (CUDA: longer sequences fit, two PCIe copies per layer; a no-op on CPU)."""
    eval_every: int = 0
    """Evaluate every N optimiser steps (0: only before and after training)."""
    eval_steps: Optional[int] = None
    """At most this many eval micro-batches per evaluation, in total over all processes (null: the whole eval split)."""
    log_every: int = 1
    """Write a metrics record every N optimiser steps."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimiser steps (0: only the final adapter)."""
    seed: int = 42
    """Seed of LoRA initialisation, dropout and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when available."""
    threads: Optional[int] = None
    """torch CPU threads (null: torch's default)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun / accelerate launch) share the work: DDP replicates the
    model, FSDP shards it (needs quant.quant_storage bf16 for the packed 4-bit weights)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the cross-entropy, so full fp32 logits never exist at once (0: no chunking)."""
    max_bad_steps: int = 10
    """Optimiser steps in a row with a non-finite (NaN / Inf) gradient norm before the run stops
    with exit status 3. Each such step is skipped (weights untouched) and no checkpoint is written
    during the streak. The same count of all-zero gradient norms in a row is warned about."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept in `checkpoints/`; older ones are deleted as new ones are written."""
    keep_best: Optional[Literal["eval_loss"]] = None
    """`eval_loss`: keep the adapter of the lowest held-out loss in `best/` (out of checkpoint rotation);
    the final `adapter/`, eval and samples are then that one. Null: the last step's adapter."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations in a row in which the held-out loss fell by no more than
    early_stopping_threshold (nats/token, default 0). Null: never stop early."""
    early_stopping_threshold: float = 0.0
    """See early_stopping_patience."""
    eval_samples: int = 0
    """Held-out prompts answered greedily at each evaluation (printed, and in its metrics record)."""
    eval_sample_tokens: int = 32
    """New tokens per answer of eval_samples (each is one forward pass)."""
    objective: Literal[OBJECTIVES] = "sft"
    """`sft` (next-token loss on the responses), or preference tuning on preference rows: `dpo`
    (dpo.loss_type sigmoid / ipo / hinge / simpo), `orpo` (NLL + odds ratio, reference-free) or `kto`
    (unpaired rows). Settings in the `dpo` section; the reference is the base with the adapters off
    (or model.adapter, frozen)."""

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("micro_batch_size", "grad_accum_steps"):
            self._require_range(name, 1, MAX_BATCH)
        for name in ("max_steps", "epochs", "eval_steps", "max_bad_steps", "keep_checkpoints",
                     "early_stopping_patience", "eval_sample_tokens"):
            self._require_range(name, 1, MAX_COUNT)
        self._require(self.max_steps is not None or self.epochs is not None, "epochs",
                      "set train.max_steps or train.epochs")
        for name in ("eval_every", "save_every", "loss_chunk_size", "eval_samples"):
            self._require_range(name, 0, MAX_COUNT)
        self._require_range("log_every", 1, MAX_COUNT)
        self._require_range("seed", 0, MAX_SEED)
        self._require_range("threads", 1, MAX_THREADS)
        self._require(self.early_stopping_threshold >= 0, "early_stopping_threshold", "expected a number >= 0")
        self._require(self.early_stopping_patience is None or self.eval_every > 0, "early_stopping_patience",
                      "early stopping needs evaluations during training: set train.eval_every > 0")
        self._require(not (self.keep_best and self.distributed == "fsdp"), "keep_best",
                      "expected null with distributed 'fsdp' (the best adapter reloads into unsharded layers)")


@dataclass
class OutputConfig(Section):
    section: ClassVar[str] = "output"

    dir: str = "runs/qlora"
    """Run folder: metrics, checkpoints, the final adapter and the resolved recipe."""
    overwrite: bool = False
    """Replace an existing run folder (otherwise refuse to start)."""
    report_to: list[Literal[choices.TRACKERS]] = field(default_factory=list)
    """Trackers that also get every metrics record: `tensorboard` (`<dir>/tensorboard/`), `wandb`
    (WANDB_MODE, e.g. offline; `<dir>/wandb/`), `mlflow` (MLFLOW_TRACKING_URI, else `<dir>/mlflow.db`).
    One not installed is skipped with a warning line (`pip install -e '.[trackers]'` installs all)."""
    tensorboard: bool = False
    """The older spelling of `report_to: [tensorboard]`: true adds tensorboard to report_to."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(bool(self.dir.strip()), "dir", "give an output folder")
        self._require(len(set(self.report_to)) == len(self.report_to), "report_to", "name each tracker once")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "output": OutputConfig,
    "dpo": PreferenceConfig,
}


@dataclass
class RecipeConfig:
    """A whole training recipe; every section defaults to its dataclass defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)

    def __post_init__(self) -> None:
        check_recipe(self)
        if self.train.distributed == "fsdp" and self.quant.enabled and self.quant.quant_storage != "bf16":
            raise UsageError(f"quant.quant_storage: {self.quant.quant_storage!r} is not allowed with "
                             "train.distributed 'fsdp'; expected 'bf16' (FSDP shards parameters of one dtype)")
        if self.lora.use_adalora:
            self._check_adalora_schedule()
        if self.train.distributed == "fsdp" and self.optim.name != "adamw":
            raise UsageError(f"optim.name: {self.optim.name!r} is not allowed with train.distributed 'fsdp'; "
                             "expected 'adamw' (bitsandbytes optimisers cannot update FSDP's sharded DTensors)")

    def _check_adalora_schedule(self) -> None:
        if self.train.max_steps is not None:  # else checked once the data gives the number of steps
            self.lora.spec().scheduled(self.train.max_steps)
        if self.train.distributed == "fsdp":
            raise UsageError("lora.use_adalora: true is not allowed with train.distributed 'fsdp' (the rank "
                             "allocator reads whole gradients); expected 'ddp'")
