"""`qlora config [RECIPE] [KEY=VALUE ...]`: every recipe key with its value, default and meaning.

Without RECIPE it prints the defaults; with one, the resolved values (overrides applied, checked as
`qlora train` checks them), each changed value followed by its default. Generated from the config
dataclasses (`qlora.config_docs`), so it is the complete and current reference of recipe keys.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config", help="print every recipe key with its value, default and meaning",
                              description="Every recipe key, section by section, with its default (or the "
                                          "recipe's value and the default) and its documentation.")
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="a recipe YAML file (default: show the defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.r=8")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.config_docs import reference
    from qlora.errors import UsageError
    from qlora.recipe import load_recipe

    if args.recipe is not None and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        raise UsageError(f"KEY=VALUE overrides need a RECIPE before them, got {args.recipe!r} first")
    cfg = load_recipe(args.recipe, list(args.overrides)) if args.recipe else None
    print(reference(cfg), end="")
    return 0
