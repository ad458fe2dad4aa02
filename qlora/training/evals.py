"""Evaluations during training: the held-out loss printed and logged, sample answers, the best
adapter kept aside, early stopping.

Each evaluation (before training, every `train.eval_every` steps, after training) prints one line
(`eval step 50: loss 1.2345 ppl 3.44`) and writes one record to metrics.jsonl (and the trackers).
With `train.eval_samples` it also answers a few held-out prompts greedily, in
`train.eval_sample_tokens` new tokens each: one forward pass per token, cheap beside an evaluation.

Best and patience follow the usual trainer rules (transformers' EarlyStoppingCallback):

    new best     loss < best_loss                 (keep_best: the adapter is written to best/)
    progress     loss < best_loss - threshold     (the patience count restarts, else it grows)
    stop         patience count >= early_stopping_patience

`BestTracker`'s state travels in every checkpoint, so a killed run resumed with --resume continues
with the same best loss and patience count. `best/` lies outside checkpoint rotation; it is a
PEFT adapter folder plus `best.json` (the record of its evaluation), replaced atomically as one
folder. A resumed run redoes its steps exactly, so a `best/` written after the checkpoint it
resumes from is written again with the same bytes; `restore_best` checks that `best.json` names
the step the tracker expects before the best weights go back into the model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn

from qlora import runtime
from qlora.adapters.peft_format import load_adapter_weights, read_adapter_weights, save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.config import TrainConfig
from qlora.inference.evaluate import evaluate
from qlora.inference.generate import generate
from qlora.io import atomic_folder, write_json_atomic
from qlora.training.metrics import MetricsLogger
from qlora.preference import describe, preference_metrics

log = logging.getLogger("qlora")
BEST = "best"
BEST_RECORD = "best.json"


@dataclass
class BestTracker:
    """The lowest held-out loss so far, its step and record, and evaluations without progress."""

    threshold: float = 0.0
    best_loss: float = math.inf
    best_step: int = -1
    best_record: dict = field(default_factory=dict)
    bad_evals: int = 0

    def update(self, step: int, record: dict) -> bool:
        """Count one evaluation; True when it is a new best."""
        loss = record["eval_loss"]
        self.bad_evals = 0 if loss < self.best_loss - self.threshold else self.bad_evals + 1
        if not loss < self.best_loss:  # NaN is never a best
            return False
        self.best_loss, self.best_step = loss, step
        self.best_record = {k: v for k, v in record.items() if k != "samples"}
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Evaluator:
    """Runs the evaluations of one training run (every process calls it; rank 0 writes)."""

    def __init__(self, tc: TrainConfig, loss_fn: nn.Module, loader, rt: runtime.Runtime, metrics: MetricsLogger,
                 model: nn.Module, tokenizer, prompts: list[str], run_dir: Path, spec: LoraSpec, base_name: str,
                 say: Callable[[str], None], style: str = "chat") -> None:
        self.tc, self.loss_fn, self.loader, self.rt, self.metrics = tc, loss_fn, loader, rt, metrics
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.best_dir, self.spec, self.base_name, self.say = Path(run_dir) / BEST, spec, base_name, say
        self.style = style  # the run's prompt style (qlora.data.prompt_style)
        self.best = BestTracker(tc.early_stopping_threshold)
        self.last_step: int | None = None
        self.last_record: dict | None = None

    def recall(self, records: list[dict], step: int) -> None:
        """Take the evaluation a resumed run already logged at `step` (its checkpoint's) as the last
        one, so a run resumed at its final step does not evaluate and log that step twice."""
        done = [r for r in records if "eval_loss" in r and r.get("step") == step]
        if done:
            self.last_step, self.last_record = step, {k: v for k, v in done[-1].items() if k != "samples"}

    def __call__(self, step: int, when: str = "") -> dict:
        """Evaluate at optimiser `step`: log, print, sample, keep the best; returns the record."""
        record = {"step": step, **evaluate(self.loss_fn, self.loader, self.rt, self.tc.eval_steps),
                  **preference_metrics(self.loss_fn, self.rt, training=False)}
        if self.prompts:
            record["samples"] = [{"prompt": p, "answer": generate(self.model, self.tokenizer, p,
                                                                  max_new_tokens=self.tc.eval_sample_tokens,
                                                                  style=self.style)}
                                 for p in self.prompts]
        new_best = self.best.update(step, record)
        if new_best and self.tc.keep_best and self.rt.is_main:
            self._save_best(record)
        self.metrics.log(record)
        self.last_step, self.last_record = step, {k: v for k, v in record.items() if k != "samples"}
        mark = " (best)" if new_best and self.tc.keep_best else ""
        self.say(f"eval step {step}{when}: loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}"
                 f"{describe(record)}{mark}")
        for sample in record.get("samples", []):
            self.say(f"  > {sample['prompt']}\n    {sample['answer']}")
        return record

    @property
    def should_stop(self) -> bool:
        patience = self.tc.early_stopping_patience
        return patience is not None and self.best.bad_evals >= patience

    def _save_best(self, record: dict) -> None:
        """best/ = this adapter + best.json, replaced as one folder."""
        with atomic_folder(self.best_dir, replace=True) as tmp:
            save_adapter(self.model, tmp, self.spec, self.base_name, prune_ranks=False,  # reloadable as is
                         tokenizer=self.tokenizer, prompt_style=self.style)
            write_json_atomic(tmp / BEST_RECORD, self.best.best_record)

    def restore_best(self) -> dict | None:
        """With keep_best, put the best evaluation's weights back into the model (when that is not
        the last one) and return its record; otherwise return the last evaluation's record."""
        final_record = self.last_record
        if not self.tc.keep_best or self.best.best_step < 0 or self.best.best_step == self.last_step:
            return final_record
        if self.rt.distributed:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has written best/
        saved = json.loads((self.best_dir / BEST_RECORD).read_text(encoding="utf-8")) \
            if (self.best_dir / BEST_RECORD).is_file() else {}
        if saved.get("step") != self.best.best_step:
            log.warning("keep_best: %s holds step %s, not the best step %s; keeping the last step's adapter",
                        self.best_dir, saved.get("step"), self.best.best_step)
            return final_record
        load_adapter_weights(self.model, read_adapter_weights(self.best_dir, as_lora=False), self.best_dir)
        self.say(f"keep_best: the adapter is step {self.best.best_step}'s "
                 f"(eval loss {self.best.best_loss:.4f}; the last step's was "
                 f"{final_record['eval_loss'] if final_record else float('nan'):.4f})")
        return dict(self.best.best_record)
