"""`qlora quantize SRC OUT`: write a bitsandbytes-format 4-bit copy of a model folder.

Quantise every linear layer except lm_head of SRC (a model folder, hub id or built-in name) and
write a Hugging Face folder that transformers loads with bitsandbytes and qlora loads without re-
quantising.
"""

from __future__ import annotations

import argparse

from qlora.choices import BLOCKSIZES, DTYPES



def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write a 4-bit (bitsandbytes format) copy of a model", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", metavar="SRC", help="model folder, hub id or built-in name (smollm2-135m, tiny-llama)")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format (default nf4)")
    p.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64, help="weights per absmax block (default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the absmax constants in fp32 (default: quantise them to 8 bits)")
    p.add_argument("--compute-dtype", choices=DTYPES, default="bf16",
                   help="dtype of the matmuls and unquantised weights (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.dtypes import torch_dtype
    from qlora.hf.export import quantize_folder
    from qlora.quant.format import QuantFormat

    fmt = QuantFormat(args.quant_type, args.blocksize, args.double_quant, compute_dtype=torch_dtype(args.compute_dtype))
    out = quantize_folder(args.src, args.out, fmt, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
