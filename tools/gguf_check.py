"""What `qlora export --gguf` costs a trained run, per GGUF type, checked by transformers and llama.cpp.

    python tools/gguf_check.py RUN_DIR OUT_DIR [--types bf16,f16,q8_0,...] [--window 256] [--prompts 4]

For the run's adapter: `qlora merge` at bf16 and f16 (the references), then one export per type
(timed). Each GGUF is scored on the run's held-out conversations (qlora.reports.gguf): perplexity
through transformers' GGUF reader and, when llama-cpp-python is installed, through llama.cpp, each
as a ratio to the merged bf16 model's. Greedy answers to the first held-out prompts: llama.cpp on
the f16 / bf16 GGUF against transformers on the merged f16 / bf16 folder. Prints a Markdown table
and writes OUT_DIR/gguf_check.json. Times are wall-clock on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from qlora.adapters.merge import merge_adapter
from qlora.gguf.export import export_gguf
from qlora.hf.folder import load_tokenizer
from qlora.reports import gguf as R
from qlora.run_dir import RunDir


def _hf(folder: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--types", default="bf16,f16,q8_0,q5_1,q5_0,q4_1,q4_0")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--no-llama-cpp", action="store_true", help="transformers only, even with llama-cpp-python installed")
    args = p.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    adapter = RunDir(args.run_dir).adapter
    merged = {}
    for dtype in ("bf16", "fp16"):
        merged[dtype] = out / f"merged-{dtype}"
        if not merged[dtype].is_dir():
            merge_adapter(adapter, merged[dtype], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    tok = load_tokenizer(merged["bf16"])
    chats = R.heldout_chats(args.run_dir)
    stream = R.heldout_stream(chats, tok)
    ref = R.hf_nll(_hf(merged["bf16"]), stream, args.window)
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None and not args.no_llama_cpp
    rows = [{"type": "merged bf16 (qlora merge)", "hf_ppl": R.ppl(ref), "hf_ratio": 1.0}]
    for name in args.types.split(","):
        path = out / f"model-{name}.gguf"
        start = time.perf_counter()
        export_gguf(adapter, path, type_name=name, overwrite=True)
        row = {"type": name, "export_s": time.perf_counter() - start, "mib": path.stat().st_size / 2**20}
        nll = R.hf_nll(_hf(out, path.name), stream, args.window)
        row.update(hf_ppl=R.ppl(nll), hf_ratio=R.ppl(nll) / R.ppl(ref))
        if has_llama_cpp:
            nll = R.llama_cpp_nll(R.llama_cpp_model(path, args.window), stream, args.window)
            row.update(llama_cpp_ppl=R.ppl(nll), llama_cpp_ratio=R.ppl(nll) / R.ppl(ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
    greedy = {}
    if has_llama_cpp:
        eos = tok.eos_token_id
        prompts = [R.first_prompt(chat, tok) for chat in chats[: args.prompts]]
        for gguf_type, dtype in (("f16", "fp16"), ("bf16", "bf16")):
            if gguf_type not in args.types.split(","):
                continue
            hf = _hf(merged[dtype])
            llm = R.llama_cpp_model(out / f"model-{gguf_type}.gguf", 512)
            pairs = [(R.hf_greedy(hf, q, args.max_new, eos), R.llama_cpp_greedy(llm, q, args.max_new, eos)) for q in prompts]
            greedy[gguf_type] = {"equal": sum(a == b for a, b in pairs), "prompts": len(pairs),
                                 "answers": [tok.decode(a, skip_special_tokens=True) for a, _ in pairs]}
            print(gguf_type, json.dumps(greedy[gguf_type]), flush=True)
    tokens = stream.numel() // args.window * (args.window - 1)
    print(f"\nheld-out: {len(chats)} conversations, {tokens} tokens scored in windows of {args.window}\n")
    print("| type | file MiB | export s | ppl (transformers) | ratio | ppl (llama.cpp) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r.get('mib', 0):.0f} | {r.get('export_s', 0):.1f} | {r['hf_ppl']:.4f} | "
              f"{r['hf_ratio']:.4f} | {r.get('llama_cpp_ppl', float('nan')):.4f} | {r.get('llama_cpp_ratio', float('nan')):.4f} |")
    (out / "gguf_check.json").write_text(json.dumps({"rows": rows, "greedy": greedy, "tokens": tokens}, indent=2) + "\n")


if __name__ == "__main__":
    main()
