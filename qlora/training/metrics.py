"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to the recipe's trackers.

Train records (one per optimiser step): step, epoch, loss, lr, tokens (cumulative input tokens),
step_time_s, tokens_per_s, grad_norm. Eval records: step, eval_loss, eval_ppl, eval_tokens, and
`samples` (prompt / answer pairs) when train.eval_samples asks for them. Preference objectives
add TRL's `rewards/*` and `logps/*` to both (`eval_`-prefixed in eval records;
`qlora.preference`). Trackers
(`output.report_to`, `qlora.training.trackers`) get each record's finite numbers.
Only the main process writes. The file is appended to, so a resumed run continues it; records of
the steps after the checkpoint it resumes from (the steps it redoes) are dropped first, so no step
appears twice. The file is strict JSON: a non-finite number (a skipped NaN step's loss and
gradient norm) is written as null, never as the bare `NaN` that strict readers reject.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora.io import named_os_errors, write_text_atomic
from qlora.run_dir import RunDir
from qlora.training.trackers import open_trackers, scalars


class MetricsLogger:
    def __init__(self, run_dir: Path, trackers: list[str] = (), config: dict | None = None, enabled: bool = True,
                 resume_step: int = 0) -> None:
        """`trackers`: names from `output.report_to`; `config`: the recipe as a dict, for the trackers."""
        self.enabled = enabled
        self.path = RunDir(run_dir).metrics
        if enabled and resume_step and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            write_text_atomic(self.path, "".join(line for line in lines if _step_at_most(line, resume_step)))
        self.trackers = open_trackers(list(trackers), Path(run_dir), config or {}) if enabled else []

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with named_os_errors(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(_line(record))
        for tracker in self.trackers:
            tracker.log(scalars(record), record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def logged_throughput(records: list[dict]) -> float | None:
    """Median tokens/s of the logged train steps (a run resumed at its final step trains none)."""
    import statistics

    speeds = [r["tokens_per_s"] for r in records if "loss" in r and r.get("tokens_per_s")]
    return statistics.median(speeds) if speeds else None


def _line(record: dict) -> str:
    """One strict-JSON line; non-finite floats become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _step_at_most(line: str, step: int) -> bool:
    """True for a whole record of a step <= `step` (a line torn by a kill is dropped too)."""
    try:
        return json.loads(line).get("step", 0) <= step and line.endswith("\n")
    except ValueError:
        return False
