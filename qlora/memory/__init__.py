"""Memory planner: the peak memory of a QLoRA training step, itemised, from a model's shapes.

`plan_memory(config, PlanSettings(...))` returns a `MemoryPlan` whose `breakdown` (bytes per item)
sums to `total_bytes`; `qlora memory` prints it. Pure arithmetic: no torch import, so the planner
answers instantly for a 70B model on any machine. The formulas are in `qlora.memory.plan`.
"""

from qlora.memory.configs import BUILTIN_MODELS, LINEAR_NAMES, ModelShape, model_shape, shape_from_config
from qlora.memory.plan import (
    GIB,
    MemoryPlan,
    PlanSettings,
    quant_bits_per_param,
    quantised_tensor_bytes,
)
from qlora.memory.planner import plan_memory

__all__ = ["BUILTIN_MODELS", "GIB", "LINEAR_NAMES", "MemoryPlan", "ModelShape", "PlanSettings",
           "plan_memory", "quant_bits_per_param", "quantised_tensor_bytes", "model_shape",
           "shape_from_config"]
