"""`qlora merge ADAPTER OUT`: fold a LoRA adapter into its base and write a 16-bit model folder.

Merge a PEFT LoRA adapter (or a run folder's adapter/) into its base model and write a 16-bit Hugging Face folder. A 4-bit base
is dequantised; an unquantised base keeps its original weights. The training recipe (recipe.yaml
beside the adapter or in its run folder) is copied too.
"""

from __future__ import annotations

import argparse

from qlora.choices import DTYPES



def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json + adapter_model.safetensors), "
                                                      "or a run folder (its adapter/)")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--base", help="base model folder, hub id or built-in name (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the merged weights (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.dtypes import torch_dtype
    from qlora.adapters.merge import merge_adapter

    out = merge_adapter(
        args.adapter, args.out, base=args.base, dtype=torch_dtype(args.dtype), overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0
