"""The planner's preference passes: 2b rows per pair batch, the reference's no-grad forward, the
frozen reference adapter, and the shipped 65B DPO recipe on a 48 GB GPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qlora.memory import GIB, PlanSettings, plan_memory
from qlora.memory.configs import builtin_shape
from qlora.memory.from_recipe import recipe_shape, settings_from_recipe
from qlora.memory.preference import no_grad_forward_bytes, plan_preference, planner_for
from qlora.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_a_pair_batch_is_a_supervised_step_of_twice_the_rows():
    shape, s = builtin_shape("smollm2-135m"), PlanSettings(micro_batch=2, seq_len=256, grad_checkpointing=False,
                                                           device="cpu", lora_r=16)
    dpo = plan_preference(shape, s, "dpo")
    sft = plan_memory(shape, replace(s, micro_batch=4))
    for item, value in sft.breakdown.items():
        assert dpo.breakdown[item] == value, item
    transient = no_grad_forward_bytes(shape, replace(s, micro_batch=4))
    backward = sft.breakdown["logits_and_loss"] + sft.breakdown["layer_backward"]
    assert dpo.breakdown["reference_forward"] == max(0, transient - backward)
    assert dpo.details["no_grad_passes"] == 1 and dpo.breakdown["reference_adapter"] == 0


def test_reference_free_precomputed_and_kto_passes():
    shape, s = builtin_shape("smollm2-135m"), PlanSettings(micro_batch=4, seq_len=512, device="cpu")
    assert plan_preference(shape, s, "dpo", reference=False).details["no_grad_passes"] == 0  # simpo, orpo
    assert plan_preference(shape, s, "dpo", precompute=True).details["no_grad_passes"] == 0
    kto = plan_preference(shape, s, "kto")
    assert kto.details["preference_rows"] == 4 and kto.details["no_grad_passes"] == 3  # reference + KL x 2
    with_adapter = plan_preference(shape, s, "dpo", reference_adapter=True)
    assert with_adapter.breakdown["reference_adapter"] == with_adapter.breakdown["lora_params"]


def test_the_65b_dpo_recipe_fits_48_gib():
    dpo_recipe = load_recipe(RECIPES / "llama_65b_dpo_48gb.yaml")
    shape, _ = recipe_shape(dpo_recipe)
    plan = planner_for(dpo_recipe)(shape, settings_from_recipe(dpo_recipe))
    sft_recipe = load_recipe(RECIPES / "llama_65b_qlora_48gb.yaml")
    sft = plan_memory(shape, settings_from_recipe(sft_recipe))
    # the recipe's header states these: ~41.6 GiB against the SFT stage's ~39.2 GiB
    assert round(plan.total_bytes / GIB, 1) == 41.6 and round(sft.total_bytes / GIB, 1) == 39.2
    assert plan.fits(48 * GIB) and plan.breakdown["reference_adapter"] == sft.breakdown["lora_params"]
