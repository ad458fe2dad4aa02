"""The one place that names the files of a training run folder.

    <run>/recipe.yaml          the resolved recipe (what actually ran)
    <run>/metrics.jsonl        one JSON record per logged step / evaluation
    <run>/adapter/             the final adapter (PEFT format)
    <run>/base/                the 4-bit base, when lora.init changed it (bitsandbytes format)
    <run>/checkpoints/step-N/  resumable checkpoints (adapter + per-rank trainer state)
    <run>/summary.json         losses before / after, throughput, output paths
    <run>/loss.png             loss curves (when matplotlib is installed)
    <run>/best/                the best evaluation's adapter + best.json (train.keep_best)
    <run>/tensorboard/         TensorBoard events (output.report_to: [tensorboard])
    <run>/wandb/, mlflow.db    wandb's run files, MLflow's local store (output.report_to)
    <run>/run.lock             pid, host and start time of the live run (qlora.training.lock)

Training writes them, eval / generate / merge / plot read them; every output is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
BASE = "base"  # the 4-bit base when lora.init changed it (PiSSA, LoftQ with loftq_iters > 1)
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"
LOCK = "run.lock"
MARKERS = (RECIPE, METRICS)  # files that make a folder a qlora run folder


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    recipe = property(lambda self: self.root / RECIPE)
    metrics = property(lambda self: self.root / METRICS)
    adapter = property(lambda self: self.root / ADAPTER)
    base = property(lambda self: self.root / BASE)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    summary = property(lambda self: self.root / SUMMARY)
    loss_plot = property(lambda self: self.root / LOSS_PLOT)
    tensorboard = property(lambda self: self.root / TENSORBOARD)

    def is_run(self) -> bool:
        """True when the folder holds a qlora run (a recipe or metrics file)."""
        return any((self.root / name).exists() for name in MARKERS)


def find_recipe(adapter_dir: Path) -> Path | None:
    """``recipe.yaml`` in an adapter folder or in its parent (the run folder it was trained in)."""
    for folder in (Path(adapter_dir), Path(adapter_dir).parent):
        if (folder / RECIPE).is_file():
            return folder / RECIPE
    return None


def saved_base(adapter_dir: Path) -> Path | None:
    """The `base/` of the run an adapter was trained in (run/adapter or a checkpoint's), if it has
    one: the 4-bit base that lora.init changed and that the adapter belongs to."""
    for folder in list(Path(adapter_dir).resolve().parents)[:3]:
        run = RunDir(folder)
        if run.is_run() and run.base.is_dir():
            return run.base
    return None


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
