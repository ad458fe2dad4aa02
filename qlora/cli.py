"""The `qlora` command line.

Each sub-command lives in `qlora/commands/<name>.py` and exposes `add_parser(subparsers)` and
`run(args) -> int`. Command modules import torch, transformers and friends only inside `run`, so
that `qlora --help` answers instantly. Exit statuses: 0 done; 2 a `UsageError` or an OS error on
the user's side (a read-only or full disk, a missing path: named with its errno, e.g. ENOSPC), one
line and no traceback; 3 a run stopped by its non-finite guard (`NonFiniteError`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qlora.argparsing import Parser
from qlora.errors import Interrupted, NonFiniteError, UsageError, describe_os_error

COMMANDS = ("train", "eval", "generate", "merge", "export", "combine", "quantize", "memory", "accuracy", "plot", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qlora",
        description="QLoRA fine-tuning: NF4 base weights, bf16 LoRA adapters, paged 8-bit optimisers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
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
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
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
    except NonFiniteError as err:
        print(f"qlora {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"qlora {args.command}: {err}", file=sys.stderr, flush=True)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
