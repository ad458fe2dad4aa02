"""Peak memory of a preference step (DPO / ORPO / KTO): the rows it runs and its reference pass.

A micro-batch of b pairs is one forward of 2b rows (chosen and rejected, padded to one length) with
grad, so its saved activations, logits chunks and gradients are those of a supervised step of
micro-batch 2b (`plan_memory`); KTO runs its b rows. Besides, with the policy's activations saved,
`qlora.preference.PreferenceLoss` runs forwards without grad:

    reference    the same rows with the adapters off / the frozen adapter (DPO, KTO), unless
                 dpo.precompute_ref (then none during the step) or the objective is reference-free
                 (SimPO, ORPO)
    KTO's KL     b mismatched rows under the policy and the reference

A no-grad forward keeps nothing for backward: at its peak it holds the residual stream and one
layer's intermediates (2*c*T*h + one layer's activation set, an upper bound: autograd frees what
the next op does not read) and, at its end, the target positions' hidden states plus one chunk of
fp32 logits and log-probs (c*N*h + 8*n*V). It runs after the policy forward and before its backward,
so it adds to the saved activations but is never alive with the backward's logits peak and layer
working set: the `reference_forward` item is its excess over those (often 0, as `layer_backward`).
The reference costs no weights: it is the same 4-bit base (and, from model.adapter, one more
adapter's A and B, counted in `reference_adapter`).
"""

from __future__ import annotations

from dataclasses import replace

from qlora.memory.configs import ModelShape, shape_from_config
from qlora.memory.plan import DTYPE_BYTES, MemoryPlan, PlanSettings, layer_activation_bytes
from qlora.memory.planner import plan_memory

PAIRED = ("dpo", "orpo")


def no_grad_forward_bytes(model: ModelShape, s: PlanSettings) -> int:
    """Peak transient bytes of one forward without grad over `s.micro_batch` rows (module docstring)."""
    c, T, h = DTYPE_BYTES[s.compute_dtype], s.tokens, model.hidden_size
    targets = s.micro_batch * (s.seq_len - 1) if s.target_tokens is None else s.target_tokens
    in_layers = 2 * c * T * h + layer_activation_bytes(model, s)
    at_head = c * T * h + targets * c * h + 8 * min(s.loss_chunk, targets) * model.vocab_size
    return max(in_layers, at_head)


def plan_preference(config: dict | ModelShape, settings: PlanSettings, objective: str = "dpo",
                    reference: bool = True, precompute: bool = False, reference_adapter: bool = False) -> MemoryPlan:
    """The plan of one preference step: `settings.micro_batch` is pairs (KTO: rows).

    `reference`: the objective reads reference log-probs (DPO but SimPO, KTO); `precompute`:
    dpo.precompute_ref (no reference pass in the step); `reference_adapter`: model.adapter is the
    frozen reference, one more adapter's weights.
    """
    model = config if isinstance(config, ModelShape) else shape_from_config(config)
    rows = 2 * settings.micro_batch if objective in PAIRED else settings.micro_batch
    s = replace(settings, micro_batch=rows)
    plan = plan_memory(model, s)
    passes = (reference and not precompute) + (objective == "kto") * (1 + (reference and not precompute))
    kl_rows = replace(s, micro_batch=settings.micro_batch)
    transient = no_grad_forward_bytes(model, s if objective in PAIRED else kl_rows) if passes else 0
    backward_peak = plan.breakdown["logits_and_loss"] + plan.breakdown["layer_backward"]
    breakdown, notes = dict(plan.breakdown), dict(plan.notes)
    breakdown["reference_forward"] = max(0, transient - backward_peak)
    notes["reference_forward"] = (f"{passes} no-grad forward(s) over {s.micro_batch if objective in PAIRED else settings.micro_batch} "
                                  f"rows ({transient / 2**30:.3f} GiB) beyond the backward peak: never alive together"
                                  if passes else "none: " + ("precomputed (dpo.precompute_ref)" if precompute
                                                             else "a reference-free objective"))
    adapter = plan.breakdown["lora_params"] if reference and reference_adapter else 0
    breakdown["reference_adapter"], notes["reference_adapter"] = adapter, (
        "model.adapter, frozen (the reference), beside the trained copy" if adapter else "none: the base is the reference")
    notes["activations"] += f"; {rows} rows per forward ({objective})"
    details = {**plan.details, "preference_rows": rows, "no_grad_forward_bytes": transient, "no_grad_passes": passes}
    return MemoryPlan(model=model, settings=s, breakdown=breakdown, notes=notes, details=details)


def planner_for(recipe):
    """(shape, settings) -> MemoryPlan for a recipe: `plan_memory`, or `plan_preference` with its objective."""
    objective = recipe.train.objective
    if objective == "sft":
        return plan_memory
    reference = recipe.dpo.uses_reference(objective)

    def plan(config, settings: PlanSettings) -> MemoryPlan:
        return plan_preference(config, settings, objective, reference, recipe.dpo.precompute_ref,
                               recipe.model.adapter is not None)

    return plan
