"""`qlora accuracy`: 4-bit weight error tables and the perplexity of each 4-bit format.

Writes DIR/accuracy.json (every number; schema in `qlora.reports.accuracy`) and DIR/accuracy.png (error
histograms, per-layer error, error vs block size), and prints a short table. The JSON is written
even when matplotlib is missing; the message then says how to install it. `--quick` measures a
subset (2 block sizes, the first 14 linear weights, 1,024 tokens) in about a minute.

Error of nf4/fp4/int4 x block size x double quant on Gaussian data, the model's linear weights and
MiniLM (with bitsandbytes' figures beside ours), and the model's perplexity on held-out English
text in bf16 and each 4-bit format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

JSON_NAME = "accuracy.json"
PNG_NAME = "accuracy.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model folder, cached hub id or built-in name (default smollm2-135m)")
    p.add_argument("--out", default="quant-accuracy", metavar="DIR",
                   help=f"output folder for {JSON_NAME} and {PNG_NAME}, created if missing (default quant-accuracy)")
    p.add_argument("--quick", action="store_true", help="a fast subset (smoke test)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("accuracy", help="4-bit quantisation error tables and perplexity per format", description=__doc__.split("\n\n", 1)[1])
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qlora.reports.accuracy import Inputs, Settings, build_report, format_table
    from qlora.errors import UsageError
    from qlora.io import write_json_atomic
    from qlora.reports.plot import plot_accuracy

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    settings = Settings.quick() if args.quick else Settings()
    report = build_report(Inputs(args.model), settings,
                          progress=lambda items: tqdm(items, leave=False, file=sys.stderr))
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out / JSON_NAME, report)
    print(format_table(report))
    print(f"wrote {json_path}")
    try:
        print(f"wrote {plot_accuracy(report, out / PNG_NAME)}")
    except UsageError as err:  # matplotlib missing: the JSON is written, say how to get the PNG
        print(f"no {PNG_NAME}: {err}", file=sys.stderr)
    return 0
