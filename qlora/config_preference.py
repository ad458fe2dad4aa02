"""The recipe's `dpo` section: the settings of the preference objectives, by TRL's names.

`train.objective` (in `qlora.config`) picks the objective; this section holds what the
preference ones read. One `beta` serves them all, as in TRL's configs: DPO's KL strength, SimPO's
reward scale, ORPO's lambda (TRL's `ORPOConfig.beta`) and KTO's beta. `check_recipe` holds the
cross-section rules (packing, a reference adapter, KTO's batch size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from qlora.errors import UsageError
from qlora.typecheck import Section

OBJECTIVES = ("sft", "dpo", "orpo", "kto")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")  # = qlora.nn.preference_loss.DPO_LOSSES (torch-free here)


@dataclass
class PreferenceConfig(Section):
    section: ClassVar[str] = "dpo"

    loss_type: Literal[DPO_LOSSES] = "sigmoid"
    """train.objective dpo: `sigmoid` (DPO), `ipo` (IPO, per-token log-ratios as TRL), `hinge` (SLiC) or
    `simpo` (SimPO: reference-free, length-normalised, margin simpo_gamma; TRL's CPO loss_type simpo)."""
    beta: float = 0.1
    """> 0. DPO / IPO / hinge: the strength of the pull towards the reference; SimPO: the reward scale
    (its paper uses 2.0-2.5); orpo: lambda, the weight of the odds-ratio term (TRL's ORPO beta);
    kto: KTO's beta."""
    label_smoothing: float = 0.0
    """sigmoid / simpo: the assumed probability that a pair's preference is flipped (cDPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (TRL's CPOConfig.simpo_gamma)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable rows' losses (> 0)."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable rows' losses (> 0)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every train / eval example once before training and keep them
    with the examples (one reference pass per example instead of one per step and epoch)."""

    def __post_init__(self) -> None:
        self._check_types()
        self._require(self.beta > 0, "beta", "expected a number > 0")
        self._require(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "expected a number in [0, 0.5)")
        for name in ("desirable_weight", "undesirable_weight"):
            self._require(getattr(self, name) > 0, name, "expected a number > 0")

    def uses_reference(self, objective: str) -> bool:
        """Whether the objective needs reference log-probs (ORPO and SimPO do not)."""
        return objective == "kto" or (objective == "dpo" and self.loss_type != "simpo")


def check_recipe(cfg) -> None:
    """Cross-section rules of a preference recipe; `cfg` is the `qlora.config.RecipeConfig` that
    calls this (not imported here: the recipe imports this section)."""
    objective = cfg.train.objective
    if objective == "sft":
        return
    if cfg.data.packing:
        raise UsageError(f"data.packing: true is not allowed with train.objective {objective!r} (a pair's rows "
                         "are scored whole); expected false")
    if objective == "kto" and cfg.train.micro_batch_size < 2:
        raise UsageError("train.micro_batch_size: 1 is not allowed with train.objective 'kto' (its KL estimate "
                         "pairs each prompt with another row's completion); expected >= 2")
    if cfg.lora.use_dora or cfg.lora.use_adalora:
        if cfg.model.adapter and cfg.dpo.uses_reference(objective):
            raise UsageError("model.adapter: a reference adapter needs plain LoRA; expected lora.use_dora and "
                             "lora.use_adalora false")
