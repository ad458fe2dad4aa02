"""Preference tuning as a loss module: batch of pairs in, (loss sum, pairs) out, TRL's metrics tallied.

`PreferenceLoss` is what the training loop and `evaluate` call in place of `CausalLMLoss`, with the
same contract: forward(**batch) -> (sum of per-example losses, number of examples), so the loop
normalises a step by its pairs (KTO: rows) over all micro-batches and processes, as it normalises
supervised steps by tokens. Per micro-batch of n pairs:

    policy      sequence_logps(model, [chosen; rejected])            2n rows, with grad
    reference   the same rows under no_grad, inside `reference()`   (or dpo.precompute_ref's values;
                                                                      none for simpo / orpo)
    KTO         + the n mismatched rows under the policy and the reference (no grad): the KL estimate
    loss        qlora.nn.preference_loss on the (n,) sums

Log-probs come from `CausalLMLoss.sequence_logps`: chunked over the target tokens, so no full fp32
logits exist. Metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected`, TRL's names, plus ORPO's `nll_loss`,
`log_odds_ratio`, `log_odds_chosen` and KTO's `kl`) are tallied per mode (train / eval) as sums
over examples and read with `pop_metrics`, once per logged step or evaluation; held-out ones get
the `eval_` prefix, as TRL writes them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

from qlora import runtime
from qlora.config import RecipeConfig
from qlora.config_preference import PreferenceConfig
from qlora.nn.loss import CausalLMLoss
from qlora.nn.preference_loss import Scored, dpo_loss, kto_loss, orpo_loss
from qlora.adapters.reference import reference_for, serving_reference

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


class PreferenceLoss(nn.Module):
    """forward(input_ids, attention_mask, labels, target_positions, units, ...) -> (loss_sum, units).

    Args:
        model: the policy (4-bit base + trainable adapters).
        objective: `dpo`, `orpo` or `kto`.
        cfg: the recipe's `dpo` section.
        reference: a zero-argument context-manager factory inside which `model` is the reference
            (`qlora.adapters.reference.reference_for`); unused by simpo / orpo.
        chunk_size: target tokens per log-prob chunk (`train.loss_chunk_size`).
    """

    def __init__(self, model: nn.Module, objective: str, cfg: PreferenceConfig,
                 reference: Callable[[], contextlib.AbstractContextManager], chunk_size: int = 1024) -> None:
        super().__init__()
        self.lm = CausalLMLoss(model, chunk_size)
        self.objective, self.cfg, self.reference = objective, cfg, reference
        self.tallies: dict[bool, defaultdict] = {True: defaultdict(lambda: [0.0, 0]), False: defaultdict(lambda: [0.0, 0])}

    @property
    def uses_reference(self) -> bool:
        return self.cfg.uses_reference(self.objective)

    def logps(self, input_ids, attention_mask, labels, target_positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.sequence_logps(input_ids, attention_mask, labels, target_positions)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels, target_positions=None) -> torch.Tensor:
        with self.reference():
            return self.logps(input_ids, attention_mask, labels, target_positions)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                target_positions: torch.Tensor | None = None, units: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, **kto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (input_ids, attention_mask, labels, target_positions)
        if self.objective == "orpo":
            return self._finish(self._orpo(*rows))
        logps, tokens = self.logps(*rows)
        if self.uses_reference and ref_logps is None:
            ref_logps = self.reference_logps(*rows)
        return self._finish(self._score(logps, tokens, ref_logps, kto))

    def _finish(self, scored: Scored) -> tuple[torch.Tensor, torch.Tensor]:
        self._tally(scored)
        return scored.losses.sum(), torch.tensor(scored.losses.numel())

    def _orpo(self, input_ids, attention_mask, labels, target_positions) -> Scored:
        """ORPO, whose NLL (as TRL's) covers the chosen rows' prompt tokens too: one forward, the
        chosen prompts' log-probs summed into buckets 2n..3n-1 beside the 2n completions'."""
        n = input_ids.shape[0] // 2
        full = labels.clone()
        full[:n] = torch.where(attention_mask[:n].bool(), input_ids[:n], full[:n])
        flat = full[:, 1:].reshape(-1)
        positions = (flat != -100).nonzero().squeeze(1)  # one device sync
        rows = torch.div(positions, labels.shape[1] - 1, rounding_mode="floor")
        completion = labels[:, 1:].reshape(-1).index_select(0, positions) != -100
        segments = torch.where(completion, rows, rows + 2 * n)
        logps, tokens = self.lm.sequence_logps(input_ids, attention_mask, full, positions, segments, 3 * n)
        return orpo_loss(self.cfg.beta, logps[:2 * n].chunk(2), tokens[:2 * n].chunk(2),
                         (logps[:n] + logps[2 * n:], tokens[:n] + tokens[2 * n:]))

    def _score(self, logps, tokens, ref_logps, kto: dict) -> Scored:
        cfg = self.cfg
        if self.objective == "kto":
            n = logps.shape[0]
            return kto_loss(cfg.beta, logps, ref_logps[:n], kto["desirable"], self._kl(kto, ref_logps),
                            cfg.desirable_weight, cfg.undesirable_weight)
        pairs = (logps.chunk(2), tokens.chunk(2))
        reference = ref_logps.chunk(2) if ref_logps is not None else None
        return dpo_loss(cfg.loss_type, cfg.beta, pairs[0], reference, pairs[1], cfg.label_smoothing, cfg.simpo_gamma)

    @torch.no_grad()
    def _kl(self, kto: dict, ref_logps: torch.Tensor) -> torch.Tensor:
        """KTO's KL estimate: mean policy - reference log-ratio of the mismatched rows, at least 0."""
        rows = (kto["kl_input_ids"], kto["kl_attention_mask"], kto["kl_labels"], kto.get("kl_target_positions"))
        policy = self.logps(*rows)[0]
        n = policy.shape[0]
        reference = ref_logps[n:] if ref_logps.shape[0] > n else self.reference_logps(*rows)
        return (policy - reference).mean().clamp(min=0)

    # --------------------------------------------------------------------------------- metrics
    def _tally(self, s: Scored) -> None:
        tally = self.tallies[self.training]
        for name, values in (("rewards/chosen", s.chosen_rewards), ("rewards/rejected", s.rejected_rewards),
                             ("logps/chosen", s.chosen_logps), ("logps/rejected", s.rejected_logps)):
            _add(tally, name, values.sum(), values.numel())
        if self.objective != "kto":  # paired: per-pair accuracy and margin
            _add(tally, "rewards/accuracies", (s.chosen_rewards > s.rejected_rewards).float().sum(), s.losses.numel())
            _add(tally, "rewards/margins", (s.chosen_rewards - s.rejected_rewards).sum(), s.losses.numel())
        for name, value in (s.extra or {}).items():
            _add(tally, name, value, 1)

    def pop_metrics(self, rt: runtime.Runtime, training: bool) -> dict[str, float]:
        """The tallied means of one mode since the last pop (summed over processes), then reset."""
        tally = self.tallies[training]
        names = sorted(tally)
        sums = runtime.all_reduce_sum([float(v) for name in names for v in tally[name]], rt)
        tally.clear()
        out = {name: sums[2 * i] / sums[2 * i + 1] for i, name in enumerate(names) if sums[2 * i + 1]}
        if self.objective == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # TRL's KTO margin
        prefix = "" if training else "eval_"
        return {prefix + name: value for name, value in out.items()}


def _add(tally: defaultdict, name: str, total: torch.Tensor | float, count: int) -> None:
    entry = tally[name]
    entry[0] = entry[0] + (total.detach() if isinstance(total, torch.Tensor) else total)  # no host read here
    entry[1] += int(count)


def objective_loss(cfg: RecipeConfig, model: nn.Module) -> nn.Module:
    """The loss module of `train.objective`: `CausalLMLoss` for sft, else `PreferenceLoss` with its reference."""
    objective = cfg.train.objective
    if objective == "sft":
        return CausalLMLoss(model, cfg.train.loss_chunk_size)
    needs_reference = cfg.dpo.uses_reference(objective)
    reference = reference_for(model, cfg.model.adapter if needs_reference else None, cfg.lora.spec())
    return PreferenceLoss(model, objective, cfg.dpo, reference, cfg.train.loss_chunk_size)


def eval_loss_for(cfg: RecipeConfig, model: nn.Module, adapters) -> nn.Module:
    """`qlora eval`'s loss for a model served by an `AdapterSet`: the objective's, and a preference
    objective's reference is the run's model.adapter (loaded frozen) or the base."""
    if cfg.train.objective == "sft":
        return CausalLMLoss(model, cfg.train.loss_chunk_size)
    reference = serving_reference(adapters, cfg.model.adapter if cfg.dpo.uses_reference(cfg.train.objective) else None)
    return PreferenceLoss(model, cfg.train.objective, cfg.dpo, reference, cfg.train.loss_chunk_size)


@torch.no_grad()
def precompute_reference(loss_fn: nn.Module, loaders: list, rt: runtime.Runtime) -> int:
    """dpo.precompute_ref: each example of the loaders' data sets gets its reference log-probs
    (`ref_chosen_logps` / `ref_rejected_logps`, KTO `ref_logps` / `ref_kl_logps`), which its batches then
    carry instead of running the reference. Returns the number of examples scored."""
    inner = getattr(loss_fn, "module", loss_fn)
    if not isinstance(inner, PreferenceLoss) or not inner.cfg.precompute_ref or not inner.uses_reference:
        return 0
    done = 0
    for loader in (loader for loader in loaders if loader is not None):
        examples, size = loader.dataset, loader.batch_sampler.batch_size
        keys = ("ref_logps", "ref_kl_logps") if "label" in examples[0] else ("ref_chosen_logps", "ref_rejected_logps")
        for start in range(0, len(examples), size):
            part = examples[start:start + size]
            batch = {k: v.to(rt.device) for k, v in loader.collate_fn(part).items()}
            first = inner.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          batch["target_positions"]).tolist()
            second = (inner.reference_logps(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"],
                                            batch["kl_target_positions"]).tolist() if "desirable" in batch
                      else first[len(part):])
            for ex, a, b in zip(part, first, second):
                ex[keys[0]], ex[keys[1]] = a, b
            done += len(part)
    return done


def preference_metrics(loss_fn: nn.Module, rt: runtime.Runtime, training: bool) -> dict[str, float]:
    """`PreferenceLoss.pop_metrics` of a (possibly DDP-wrapped) loss module; {} for other losses."""
    inner = getattr(loss_fn, "module", loss_fn)
    return inner.pop_metrics(rt, training) if isinstance(inner, PreferenceLoss) else {}


def describe(record: dict) -> str:
    """` reward accuracy 0.75 margin 0.123` for a preference eval record, else ``."""
    if "eval_rewards/accuracies" not in record:
        return ""
    return f" reward accuracy {record['eval_rewards/accuracies']:.3f} margin {record['eval_rewards/margins']:.4f}"
