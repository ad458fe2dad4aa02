"""The `qlora` command line.

Each sub-command lives in `qlora/commands/<name>.py` and exposes `add_parser(subparsers)` and
`run(args) -> int`. Command modules import torch, transformers and friends only inside `run`, so
that `qlora --help` answers instantly. `UsageError` (and other `ValueError`s raised while reading
user input) print one line and exit with status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qlora.errors import UsageError

COMMANDS = ("train", "eval", "generate", "merge", "quantize", "memory", "accuracy", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora",
        description="QLoRA fine-tuning: NF4 base weights, bf16 LoRA adapters, paged 8-bit optimisers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        if module is not None:
            module.add_parser(sub)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"qlora.commands.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"qlora.commands.{name}":
            return None  # command not shipped in this build
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`train R --resume a.b=1`); argparse stops
    # collecting a positional list at the first option, so gather the rest here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except UsageError as err:
        print(f"qlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
