"""`qlora export SOURCE --gguf OUT.gguf`: a run, adapter or model as one GGUF file for llama.cpp / Ollama.

Write a run folder's adapter (merged into its base exactly as `qlora merge` does), an adapter
folder, or a model as a GGUF file for llama.cpp, Ollama and LM Studio, with the tokenizer and the
chat template the run trained with, and an Ollama Modelfile beside it (OUT.Modelfile). A 4-bit base
is dequantised exactly before the GGUF type quantises it again.
"""

from __future__ import annotations

import argparse

from qlora.choices import GGUF_TYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run, adapter or model as GGUF (llama.cpp, Ollama)",
                              description=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", metavar="RUN_DIR|ADAPTER|MODEL",
                   help="run folder, adapter folder, or model folder / built-in name")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", choices=GGUF_TYPES, default="bf16",
                   help="tensor type: bf16 / f16 as merged, or a llama.cpp block quantisation (default bf16)")
    p.add_argument("--base", help="base model folder, hub id or built-in name (default: the adapter's base)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf and its Modelfile if they exist")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.gguf.export import export_gguf
    from qlora.gguf.modelfile import modelfile_path

    out = export_gguf(args.source, args.gguf, type_name=args.type, base=args.base, overwrite=args.overwrite)
    print(f"wrote {out} ({args.type}) and {modelfile_path(out)}")
    return 0
