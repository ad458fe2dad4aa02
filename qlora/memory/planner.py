"""`plan_memory`: the one entry point of the planner, for dense and mixture-of-experts models.

A dense model is planned by `qlora.memory.plan.plan_dense`; a model with fused experts (or a plan
with expert LoRA) by `qlora.memory.moe.plan_moe`, which builds on the dense formulas. Keeping the
choice here lets both modules import downwards only.
"""

from __future__ import annotations

from qlora.memory.configs import ModelShape, shape_from_config
from qlora.memory.moe import plan_moe
from qlora.memory.plan import MemoryPlan, PlanSettings, plan_dense


def plan_memory(config: dict | ModelShape, settings: PlanSettings | None = None) -> MemoryPlan:
    """Itemised peak memory of one QLoRA training step of `config` under `settings`."""
    model = config if isinstance(config, ModelShape) else shape_from_config(config)
    s = settings if settings is not None else PlanSettings()
    if model.moe is not None or s.lora_target_parameters:
        return plan_moe(model, s)
    return plan_dense(model, s)
