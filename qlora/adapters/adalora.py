"""AdaLoRA's rank allocation (Zhang et al., 2023), and AdaLoRA adapters as LoRA adapters.

Training (`RankAllocator`, one training hook; see qlora.adapters.hooks). After every optimiser
step, for each adapter tensor w (A, E and B of every `AdaLoRALinear`) with its gradient g:

    I      = |w * g|                                      sensitivity, elementwise
    Ibar  <- beta1 * Ibar + (1 - beta1) * I               smoothed sensitivity
    U     <- beta2 * U + (1 - beta2) * |I - Ibar|         its uncertainty
    score  = Ibar * U

and triplet i of a layer scores S_i = score(E)_i + mean_j score(A)_ij + mean_k score(B)_ki. The
budget b(t) (the total kept rank over all layers) follows the cubic schedule

    b(t) = r * L                                                    t <= tinit
    b(t) = (r - target_r) * L * (1 - (t - tinit) / (T - tfinal - tinit))^3 + target_r * L
    b(t) = target_r * L                                             t >= T - tfinal

(L layers, T = total_step, the integer part taken), and every `delta_t` steps the triplets whose
score is at or below the (r L - b)-th smallest are masked (E_i = 0). At t = T - tfinal the mask
is final; later steps re-apply it. The loss carries orth_reg_weight times the mean over all A and
B of ||A A^T - I||_F, ||B^T B - I||_F (`penalty`). This is PEFT's RankAllocator step for step,
so a run matches PEFT's masks (tested); the smoothed scores are training state and go into
checkpoints (`state_dict`), so a resumed run masks exactly as an uninterrupted one.

On disk: the final adapter keeps only the triplets with a non-zero E_i (the masked-in ones) and
names them in PEFT's `rank_pattern` ({"<fqn>.lora_E": [bool] * r}), which PEFT reads. Checkpoints keep the whole
tensors (the masked-out rows of A and B still train and matter for an exact resume).

Reading (`lora_equivalent`): an AdaLoRA adapter is the LoRA adapter A' = A * E, B' = B with the
masked-out triplets as zero rows/columns (rank r again) and alpha' = alpha * r / (r + 1e-5), so
s' B' A' is exactly AdaLoRA's update; merging, composition, hot swap and inference then treat it
as any LoRA adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.adapters.spec import PEFT_PREFIX, AdaLoraSchedule
from qlora.nn.adalora import AdaLoRALinear

FACTORS = ("lora_A", "lora_E", "lora_B")


def budget(schedule: AdaLoraSchedule, initial: int, target: int, step: int) -> tuple[int, bool]:
    """(total kept rank at optimiser step `step`, whether to mask at this step): PEFT's schedule."""
    total, tinit, tfinal = schedule.total_step, schedule.tinit, schedule.tfinal
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * remaining**3 + target), step % schedule.delta_t == 0


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


class RankAllocator:
    """AdaLoRA's importance scores, budget schedule, masking and orthogonality penalty (a training
    hook: `penalty()`, `after_step(step)`, `state_dict()`, `load_state_dict()`)."""

    def __init__(self, model: nn.Module, schedule: AdaLoraSchedule) -> None:
        if schedule.total_step is None:
            raise ValueError("RankAllocator: the schedule has no total_step (LoraSpec.scheduled)")
        self.schedule = schedule
        self.layers = adalora_layers(model)
        self.initial = sum(layer.r for layer in self.layers.values())
        self.target = schedule.target_r * len(self.layers)
        self.ema_ipt: dict[str, torch.Tensor] = {}
        self.ema_unc: dict[str, torch.Tensor] = {}
        self.final_step = schedule.total_step - schedule.tfinal

    def _tensors(self):
        for fqn, layer in self.layers.items():
            for name, (param, _) in layer.trainable_parameters().items():
                yield f"{fqn}.{name}", param

    def penalty(self) -> torch.Tensor | None:
        """orth_reg_weight * the mean Frobenius distance of every A A^T and B^T B from I."""
        if not self.layers or self.schedule.orth_reg_weight == 0:
            return None
        total = sum(layer.orthogonality_penalty() for layer in self.layers.values())
        return total * (self.schedule.orth_reg_weight / (2 * len(self.layers)))

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        """Called after optimiser step `step` (1-based) with the step's gradients still in place."""
        if step < self.final_step:
            self._update_scores()
            kept, mask_now = budget(self.schedule, self.initial, self.target, step)
            if mask_now:
                self._mask_to_budget(kept)
        elif step == self.final_step:
            self._mask_to_budget(self.target)
            self.ema_ipt, self.ema_unc = {}, {}
        else:
            for layer in self.layers.values():
                layer.apply_rank_mask(layer.rank_mask)
        return {"adalora_rank": sum(int(layer.rank_mask.sum()) for layer in self.layers.values())}

    def _update_scores(self) -> None:
        beta1, beta2 = self.schedule.beta1, self.schedule.beta2
        for key, param in self._tensors():
            if param.grad is None:
                continue
            ipt = (param.float() * param.grad.float()).abs()
            if key not in self.ema_ipt:
                self.ema_ipt[key], self.ema_unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
            self.ema_ipt[key].mul_(beta1).add_(ipt, alpha=1 - beta1)
            self.ema_unc[key].mul_(beta2).add_((ipt - self.ema_ipt[key]).abs(), alpha=1 - beta2)

    def _triplet_scores(self, fqn: str) -> torch.Tensor:
        """S_i = score(E)_i + mean_j score(A)_ij + mean_k score(B)_ki for one layer, (r,)."""
        layer = self.layers[fqn]

        def score(name: str) -> torch.Tensor:
            key = f"{fqn}.{name}"
            if key not in self.ema_ipt:
                return torch.zeros_like(layer.lora_E, dtype=torch.float32)
            return self.ema_ipt[key] * self.ema_unc[key]

        return score("lora_E").view(-1) + score("lora_A").mean(dim=1).view(-1) + score("lora_B").mean(dim=0).view(-1)

    def _mask_to_budget(self, kept: int) -> None:
        drop = self.initial - kept
        if drop <= 0:  # nothing to mask (PEFT's kthvalue would fail on k = 0)
            return
        scores = {fqn: self._triplet_scores(fqn) for fqn in self.layers}
        threshold = torch.kthvalue(torch.cat(list(scores.values())).cpu(), drop).values
        for fqn, layer in self.layers.items():
            layer.apply_rank_mask(scores[fqn] > threshold.to(scores[fqn].device))

    def state_dict(self) -> dict:
        return {"ema_ipt": dict(self.ema_ipt), "ema_unc": dict(self.ema_unc),
                "masks": {fqn: layer.rank_mask.cpu() for fqn, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ema_ipt = {k: v.to(self._device(k)) for k, v in state["ema_ipt"].items()}
        self.ema_unc = {k: v.to(self._device(k)) for k, v in state["ema_unc"].items()}
        for fqn, mask in state["masks"].items():
            self.layers[fqn].rank_mask.copy_(mask)

    def _device(self, key: str) -> torch.device:
        return self.layers[key.rpartition(".")[0]].lora_E.device


# ------------------------------------------------------------------------------- on disk


def rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    """PEFT's `rank_pattern` of the model's AdaLoRA layers: `<fqn>.lora_E` -> kept triplets.

    A triplet is kept when its singular value is non-zero: the allocator's mask zeroes exactly the
    masked ones, and dropping a zero E_i never changes the update, so the pattern is right for any
    weights the model holds (also a best evaluation's, put back after later masking).
    """
    return {f"{fqn}.lora_E": (layer.lora_E.detach().view(-1) != 0).tolist()
            for fqn, layer in adalora_layers(model).items()}


def prune(tensors: dict[str, torch.Tensor], pattern: dict[str, list[bool]]) -> dict[str, torch.Tensor]:
    """PEFT-keyed AdaLoRA tensors with only the kept triplets (rows of A and E, columns of B)."""
    out = dict(tensors)
    for key, kept in pattern.items():
        module = PEFT_PREFIX + key.removesuffix(".lora_E")
        index = torch.tensor(kept, dtype=torch.bool)
        for factor in FACTORS:
            tensor = out[f"{module}.{factor}"]
            out[f"{module}.{factor}"] = (tensor[:, index] if factor == "lora_B" else tensor[index]).contiguous()
    return out


def lora_equivalent(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The LoRA adapter (keys `<fqn>.lora_A.weight` / `.lora_B.weight`, rank init_r) with the
    same update as the AdaLoRA `tensors` of `config` (see the module docstring); fp32."""
    r, pattern = config["init_r"], config.get("rank_pattern") or {}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_E"):
            continue
        module = key.removesuffix(".lora_E")
        a, e, b = (tensors[f"{module}.{factor}"].float() for factor in FACTORS)
        kept = torch.tensor(pattern.get(module.removeprefix(PEFT_PREFIX) + ".lora_E", [True] * r), dtype=torch.bool)
        lora_A, lora_B = torch.zeros(r, a.shape[1]), torch.zeros(b.shape[0], r)
        lora_A[kept], lora_B[:, kept] = a * e, b
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = lora_A, lora_B
    return out

