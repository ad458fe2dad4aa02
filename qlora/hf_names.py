"""Hugging Face's and TRL's names for recipe keys and values, so that a user who types them is told ours.

Users arrive from `transformers.TrainingArguments`, PEFT's `LoraConfig`, TRL's `SFTConfig` and
`BitsAndBytesConfig`, and type their names: `optim.learning_rate`, `lora.rank`,
`optim.name=adamw_torch`, `optim.scheduler=cosine_with_warmup`. A string-distance suggestion does
not find `lr` from `learning_rate` (it offered `adamw_8bit` for `adamw_torch`), so these are
mapped by name. They are hints in the error, not aliases: a recipe keeps one spelling of each
key, the one `qlora config` documents, and the saved `recipe.yaml` reads the same as the recipe.
"""

from __future__ import annotations

KEYS = {  # their key (any section) -> ours, "section.key"
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.scheduler", "optim": "optim.name",
    "adam_beta1": "optim.betas", "adam_beta2": "optim.betas", "adam_epsilon": "optim.eps",
    "max_grad_norm": "optim.max_grad_norm", "weight_decay": "optim.weight_decay",
    "warmup_steps": "optim.warmup_steps", "warmup_ratio": "optim.warmup_ratio",
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets", "init_lora_weights": "lora.init", "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
    "per_device_train_batch_size": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.epochs", "max_steps": "train.max_steps", "logging_steps": "train.log_every",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_checkpoints",
    "load_best_model_at_end": "train.keep_best", "metric_for_best_model": "train.keep_best",
    "gradient_checkpointing": "train.gradient_checkpointing", "seed": "train.seed",
    "max_seq_length": "data.max_length", "max_length": "data.max_length", "packing": "data.packing",
    "dataset_text_field": "data.columns", "completion_only_loss": "data.train_on_prompt",
    "assistant_only_loss": "data.train_on_prompt", "dataset_name": "data.dataset",
    "model_name_or_path": "model.name_or_path", "bf16": "model.dtype", "torch_dtype": "model.dtype",
    "load_in_4bit": "quant.enabled", "bnb_4bit_quant_type": "quant.quant_type",
    "bnb_4bit_use_double_quant": "quant.double_quant", "bnb_4bit_compute_dtype": "model.dtype",
    "output_dir": "output.dir", "overwrite_output_dir": "output.overwrite", "report_to": "output.report_to",
}

VALUES = {  # (section, key) -> {their value: (ours, a note)}
    ("optim", "name"): {
        "adamw_torch": ("adamw", ""), "adamw_torch_fused": ("adamw", ""), "adamw_hf": ("adamw", ""),
        "adamw_bnb_8bit": ("adamw_8bit", ""), "paged_adamw": ("paged_adamw_32bit", ""),
    },
    ("optim", "scheduler"): {
        "cosine_with_warmup": ("cosine", "every schedule warms up over optim.warmup_steps / warmup_ratio"),
        "linear_with_warmup": ("linear", "every schedule warms up over optim.warmup_steps / warmup_ratio"),
        "constant_with_warmup": ("constant", "every schedule warms up over optim.warmup_steps / warmup_ratio"),
        "cosine_with_min_lr": ("cosine", "with optim.min_lr_ratio"),
    },
}


def key_hint(section: str, key: str) -> str | None:
    """` (did you mean optim.lr? ...)` for a Hugging Face key name, else None."""
    ours = KEYS.get(key)
    if ours is None or ours == f"{section}.{key}":
        return None
    return f" (did you mean {ours}? {key!r} is the Hugging Face name)"


def value_hint(section: str, key: str, value) -> str | None:
    """` (did you mean 'adamw'? ...)` for a Hugging Face value of `section.key`, else None."""
    found = VALUES.get((section, key), {}).get(value) if isinstance(value, str) else None
    if found is None:
        return None
    ours, note = found
    return f" (did you mean {ours!r}? {value!r} is the Hugging Face name{'; ' + note if note else ''})"
