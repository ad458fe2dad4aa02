"""Experiment trackers: the run's metrics records, mirrored to TensorBoard, Weights & Biases or MLflow.

`metrics.jsonl` is the record of a run; trackers are views of it for the tools users already
watch. Each is opened through its library's own API (`torch.utils.tensorboard.SummaryWriter`,
`wandb.init` / `wandb.log`, `mlflow.start_run` / `mlflow.log_metrics`) and gets the finite
numbers of every record at the record's optimiser step. The libraries are optional: a tracker
named in `output.report_to` whose library is missing is skipped with one warning line naming the
install command, and the run goes on.

Where the data goes is each library's own business, steered by its own environment variables:
wandb honours WANDB_MODE (`offline` writes the run under `<run>/wandb/` only) and WANDB_PROJECT
(default `qlora`); MLflow honours MLFLOW_TRACKING_URI and otherwise writes an SQLite store,
`<run>/mlflow.db` (MLflow 3's local backend; its plain-file store is deprecated). A resumed run appends to new tracker runs (TensorBoard to the same folder), so
the redone steps appear twice there; `metrics.jsonl` keeps one record per step.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from qlora.run_dir import RunDir

log = logging.getLogger("qlora")
INSTALL_HINT = "pip install -e '.[trackers]'"


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, without its step (trackers take that separately)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is missing

        self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, run_dir: Path, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qlora"), name=Path(run_dir).resolve().name,
                              dir=str(run_dir), config=config, reinit="finish_previous")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, run_dir: Path, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
        self.run = mlflow.start_run(run_name=Path(run_dir).resolve().name)
        mlflow.log_params(_flat(config))

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow (with sqlalchemy)"}


def tracker_names(output) -> list[str]:
    """The trackers an `OutputConfig` asks for: report_to, plus tensorboard when the older
    `output.tensorboard: true` asks for it."""
    extra = ["tensorboard"] if output.tensorboard and "tensorboard" not in output.report_to else []
    return [*output.report_to, *extra]


def open_trackers(names: list[str], run_dir: Path, config: dict) -> list:
    """The trackers of `names` that can be opened; a missing library costs one warning line."""
    opened = []
    for name in names:
        try:
            opened.append(TRACKERS[name](run_dir, config))
        except ImportError as err:
            log.warning("output.report_to: %s is not installed (%s), not reporting to it; %s",
                        PACKAGES[name], err, INSTALL_HINT)
    return opened


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe dict as `section.key -> str(value)`, MLflow's parameter form."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
