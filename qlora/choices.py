"""The allowed values that several parts check against: one list each, importable without torch.

Recipes (`qlora.config`), the CLI's argument choices, the memory planner and the kernels all read
these, so a new 4-bit type or optimiser is added in one place.
"""

from __future__ import annotations

DTYPES = ("bf16", "fp16", "fp32")
"""Short dtype names used in recipes and on the command line."""
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Short name -> the torch attribute name transformers and bitsandbytes write in JSON."""
QUANT_TYPES = ("nf4", "fp4", "int4")

GGUF_TYPES = ("bf16", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # `qlora export --gguf --type`
"""4-bit codebooks; bitsandbytes has the first two (`BNB_QUANT_TYPES`)."""
BNB_QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Weights per absmax block."""
QUANT_STORAGE = ("uint8", "bf16")

DATA_FORMATS = ("auto", "alpaca", "input-output", "prompt-completion", "chat", "sharegpt", "text", "preference",
                "unpaired-preference")
"""Row layouts of training data (`qlora.data.formats`, the preference ones in
`qlora.data.preference_rows`); `auto` picks one by the columns present."""
LORA_INITS = ("default", "loftq", "pissa")  # adapter initialisation (qlora.adapters.init)
"""What the packed 4-bit bytes are viewed as (bf16 lets FSDP shard them beside bf16 parameters)."""
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw")
"""Optimiser names: bitsandbytes' paged / 8-bit AdamW variants, or qlora's AdamW (fp32 moments)."""
TRACKERS = ("tensorboard", "wandb", "mlflow")
"""Experiment trackers a run can report to (`output.report_to`), each through its own library."""
COMBINE_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
                   "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
"""`qlora combine` methods, PEFT's `add_weighted_adapter` names (`*_svd`: the rank-R SVD of the
combined delta instead of combining the A and B factors separately)."""
