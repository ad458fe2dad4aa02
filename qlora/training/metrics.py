"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard when installed.

Train records (one per optimiser step): step, epoch, loss, lr, tokens (cumulative input tokens),
step_time_s, tokens_per_s, grad_norm. Eval records: step, eval_loss, eval_ppl, eval_tokens.
Only the main process writes. The file is appended to, so a resumed run continues it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora.run_dir import RunDir


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = RunDir(run_dir).metrics
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
