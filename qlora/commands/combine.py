"""`qlora combine OUT --adapter DIR[:WEIGHT] ... --method M`: several LoRA adapters -> one.

Combine PEFT LoRA adapters of the same base into one adapter (PEFT's add_weighted_adapter methods):
cat (exact, rank = sum of ranks), linear / ties / dare_linear / dare_ties / magnitude_prune (A and
B combined separately; one rank for all), and their _svd forms (the rank-R SVD of the combined
update). With --merge, write a bf16 model with the combined adapter folded in instead.
"""

from __future__ import annotations

import argparse

from qlora.choices import COMBINE_METHODS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("combine", help="combine several LoRA adapters into one", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR[:WEIGHT]",
                   help="an adapter folder and its weight (default 1.0); repeat for each adapter")
    p.add_argument("--method", choices=COMBINE_METHODS, required=True, help="how to combine (see the description)")
    p.add_argument("--density", type=float, help="fraction of entries kept by ties / dare_* / magnitude_prune")
    p.add_argument("--rank", type=int, help="rank of an _svd method's result (default: the largest input rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    p.add_argument("--merge", action="store_true", help="write a bf16 model with the result merged into its base")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def parse_adapter(item: str) -> tuple[str, float]:
    """`DIR[:WEIGHT]` -> (DIR, WEIGHT); a tail that is not a number stays part of DIR."""
    folder, _, tail = item.rpartition(":")
    try:
        return (folder, float(tail)) if folder else (item, 1.0)
    except ValueError:
        return item, 1.0


def run(args: argparse.Namespace) -> int:
    from qlora.adapters.combine import combine_adapters

    dirs, weights = zip(*(parse_adapter(item) for item in args.adapter))
    out = combine_adapters(dirs, weights, args.out, args.method, density=args.density, rank=args.rank,
                           seed=args.seed, merge=args.merge, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
