"""`qlora plot RUN_DIR`: loss curves of a training run as a PNG.

Reads RUN_DIR/metrics.jsonl (written by `qlora train`) and draws train loss against optimiser step
(eval loss on top) and against tokens seen, and the learning rate; for a preference run also the
reward accuracy and margins (train and held-out). Needs matplotlib
(`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="plot the loss curves of a training run",
        description="Loss curves (train loss vs step and tokens, eval loss, learning rate) from "
                    "RUN_DIR/metrics.jsonl, written as a PNG.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder holding metrics.jsonl")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default RUN_DIR/loss.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.reports.plot import plot_loss_curves

    out = Path(args.out) if args.out else Path(args.run_dir) / "loss.png"
    print(f"wrote {plot_loss_curves(args.run_dir, out)}")
    return 0
