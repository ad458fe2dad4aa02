"""Figures: training loss curves and the quantisation-accuracy report.

matplotlib is an optional extra (``pip install -e '.[plot]'``). It is imported only when a figure
is drawn, with the non-interactive Agg backend (no display needed); when it is missing,
``MatplotlibMissing`` (a ``UsageError``) says how to install it, so tools can still write their
JSON and explain why the PNG is absent. Figures are rendered to memory and written atomically
(temporary file, then rename), so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from qlora.display import BETA, ema
from qlora.errors import UsageError
from qlora.io import write_bytes_atomic
from qlora.run_dir import read_metrics

INSTALL_HINT = "pip install -e '.[plot]' (or pip install matplotlib)"


class MatplotlibMissing(UsageError):
    """matplotlib is not installed; the message says how to install it."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``MatplotlibMissing``."""
    try:
        import matplotlib
    except ImportError as err:
        raise MatplotlibMissing(f"plotting needs matplotlib: {INSTALL_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render ``fig`` as PNG and write it atomically to ``path``; the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return write_bytes_atomic(Path(path), buf.getvalue())


# ================================================================================ loss curves


def load_run_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, one per step (a resumed run's later record wins)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise UsageError(f"RUN_DIR {str(run_dir)!r} has no metrics.jsonl (written by `qlora train`)")
    try:
        records = read_metrics(run_dir)
    except ValueError as err:  # json.JSONDecodeError
        raise UsageError(f"{run_dir / 'metrics.jsonl'}: not one JSON object per line ({err})") from err
    train = {r["step"]: r for r in records if isinstance(r, dict) and "loss" in r and "step" in r}
    evals = {r["step"]: r for r in records if isinstance(r, dict) and "eval_loss" in r and "step" in r}
    if not train and not evals:
        raise UsageError(f"{run_dir / 'metrics.jsonl'} has no train ('loss') or eval ('eval_loss') records")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def plot_loss_curves(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Train (and eval) loss against step (raw and smoothed) and against tokens seen, and the
    learning rate, as a PNG; a preference run (TRL's `rewards/*` metrics) adds its reward accuracy
    and margins."""
    return save_figure(loss_figure(run_dir), out)


def loss_figure(run_dir: str | os.PathLike):
    """The figure of `plot_loss_curves` (three panels under one title), not yet rendered."""
    train, evals = load_run_metrics(run_dir)
    plt = pyplot()
    # constrained layout keeps the suptitle above the panel titles and each y-label clear of the
    # neighbouring panel's tick labels.
    rewards = any("rewards/accuracies" in r for r in train) or any("eval_rewards/accuracies" in r for r in evals)
    fig, axes = plt.subplots(1, 4 if rewards else 3, figsize=(20 if rewards else 15, 4.4), layout="constrained")
    ax_step, ax_tok, ax_lr = axes[:3]
    if rewards:
        reward_panel(axes[3], train, evals)
    steps = [r["step"] for r in train]
    if train:  # the raw per-step loss, faint, under its moving average (qlora.display.ema)
        raw = [r["loss"] if r["loss"] is not None else math.nan for r in train]
        ax_step.plot(steps, raw, lw=0.8, alpha=0.35, color="C0", label="train (per step)")
        ax_step.plot(steps, ema(raw), lw=1.6, color="C0", label=f"train (smoothed, EMA {BETA})")
    if evals:
        ax_step.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax_step.set(xlabel="optimiser step", ylabel="loss (nats/token)", title="loss")
    ax_step.legend()

    with_tokens = [r for r in train if "tokens" in r]
    if with_tokens:
        ax_tok.plot([r["tokens"] for r in with_tokens], [r["loss"] for r in with_tokens], lw=1)
    ax_tok.set(xlabel="tokens seen", ylabel="train loss", title="train loss vs tokens")

    with_lr = [r for r in train if "lr" in r]
    if with_lr:
        ax_lr.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], lw=1)
    ax_lr.set(xlabel="optimiser step", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    fig.suptitle(f"run {Path(run_dir).resolve().name}", fontweight="bold")
    return fig


def reward_panel(ax, train: list[dict], evals: list[dict]) -> None:
    """A preference run's reward accuracy (train and held-out) and margins (right axis) against step."""
    for records, prefix, style, label in ((train, "", "-", "train"), (evals, "eval_", "o-", "eval")):
        kept = [r for r in records if r.get(f"{prefix}rewards/accuracies") is not None]
        if kept:
            steps = [r["step"] for r in kept]
            ax.plot(steps, [r[f"{prefix}rewards/accuracies"] for r in kept], style, lw=1, label=f"{label} accuracy")
            ax.plot(steps, [r[f"{prefix}rewards/margins"] for r in kept], style, lw=1, alpha=0.6,
                    label=f"{label} margin")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="optimiser step", ylabel="reward accuracy / margin", title="rewards (chosen vs rejected)")
    ax.legend(fontsize=7)


# ================================================================================ accuracy report


def plot_accuracy(report: dict, out: str | os.PathLike) -> Path:
    """Three panels from a ``qlora.reports.accuracy`` report: error histograms and per-layer relative error
    on the model's weights (double quant, detail block size), and relative error vs block size."""
    plt = pyplot()
    model, bs = report["model"], report["settings"]["detail_blocksize"]
    details = report["errors"][model]["details"]
    fig, (ax_hist, ax_layer, ax_bs) = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, (quant_type, d) in enumerate(details.items()):
        h = d["histogram"]
        centres = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        ax_hist.step(centres, [max(c, 0.5) for c in h["counts"]], where="mid", color=f"C{i}", label=quant_type)
        ax_layer.plot([100 * t["rel_l2_error"] for t in d["per_tensor"]], lw=1, color=f"C{i}", label=quant_type)
    ax_hist.set(yscale="log", xlabel="W - Q(W)", ylabel="weights",
                title=f"{model}: 4-bit error, block {bs} + double quant")
    ax_hist.legend()
    ax_layer.set(xlabel="linear weight (layer order)", ylabel="||W-Q(W)|| / ||W|| (%)",
                 title=f"per-tensor relative error, block {bs} + double quant")
    ax_layer.legend()

    styles, colours = ["-", "--", ":", "-."], {qt: f"C{i}" for i, qt in enumerate(details)}
    for i, (set_name, table) in enumerate(report["errors"].items()):
        for quant_type in dict.fromkeys(r["quant_type"] for r in table["rows"]):
            rows = sorted((r for r in table["rows"] if r["quant_type"] == quant_type and r["double_quant"]),
                          key=lambda r: r["blocksize"])
            colour = colours.setdefault(quant_type, f"C{len(colours)}")
            ax_bs.plot([r["blocksize"] for r in rows], [100 * r["rel_l2_error"] for r in rows], styles[i % 4],
                       color=colour, marker="o", ms=3, label=f"{set_name} {quant_type}")
    blocksizes = report["settings"]["blocksizes"]
    ax_bs.set(xscale="log", xlabel="block size", ylabel="relative L2 error (%)",
              title="error vs block size (double quant)")
    ax_bs.set_xticks(blocksizes, [str(b) for b in blocksizes])
    ax_bs.minorticks_off()
    ax_bs.legend(fontsize=7)
    return save_figure(fig, out)
