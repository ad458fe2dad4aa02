#!/usr/bin/env python
"""Quantisation accuracy report: the same as `qlora accuracy`, as a script.

    python tools/quant_accuracy.py [--model smollm2-135m] [--out DIR] [--quick]

Error tables (mean abs, relative L2, max abs) for nf4/fp4/int4 x block size x double quant on
Gaussian data, the model's linear weights and the fp32 MiniLM encoder, with bitsandbytes' figures
beside ours; the model's perplexity on held-out English text in bf16 and each 4-bit format. Writes
DIR/accuracy.json and DIR/accuracy.png; see `qlora.reports.accuracy` for the definitions.
"""

from __future__ import annotations

import argparse
import sys

from qlora.commands.accuracy import add_arguments, run
from qlora.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant_accuracy.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"quant_accuracy.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
