#!/usr/bin/env python
"""Benchmark qlora's DPO step against TRL's DPOTrainer + PEFT + bitsandbytes, same batches, one run.

    python tools/bench_dpo.py [--model smollm2-135m] [--steps 4] [--pairs 4] [--length 256] [--json PATH]

Each stack runs in a fresh subprocess (no shared heap or thread pools) on the same 4-bit NF4 +
double-quant base with the same LoRA (r=16, alpha 32, dropout 0.05, all linear layers), 2 threads,
no gradient checkpointing, DPO sigmoid beta 0.1, and the same `--steps` batches of `--pairs`
pairs: seeded random prompts of length/2 tokens and chosen / rejected completions of length/2
tokens, so every row is `--length` tokens (no padding; both stacks score the same completion tokens).

    ours  `qlora.training.build.build_model` + `qlora.preference.PreferenceLoss` (reference:
          the base with the adapters off; chunked log-probs) + the recipe's paged 8-bit AdamW
    peer  `AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
          quant, bf16))` given to `trl.DPOTrainer(peft_config=LoraConfig(...))` (TRL prepares the
          k-bit model and wraps it; its reference is the same model with the adapter disabled: one
          base), the loss `trainer.compute_loss`, bitsandbytes AdamW8bit

Per stack: median step time and tokens/s over steps 2..N (step 1 pays one-off allocations), the
peak anonymous RSS (`RssAnon`, sampled every 5 ms) during the steps minus the RssAnon after the
imports (both import torch, transformers, peft, trl, bitsandbytes and qlora first). On a shared
machine only the ratios mean something; the load average is printed before each stack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool
from bench_train import run_child  # noqa: E402

MB = 1024 ** 2


def _batches(args, vocab: int) -> list[list[dict]]:
    g = torch.Generator().manual_seed(0)
    half = args.length // 2

    def ids() -> list[int]:
        return torch.randint(10, vocab, (half,), generator=g).tolist()

    return [[{"prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()} for _ in range(args.pairs)]
            for _ in range(args.steps)]


def _ours(folder: str):
    from qlora import runtime
    from qlora.config_preference import PreferenceConfig
    from qlora.data.preference import collate_preference
    from qlora.recipe import recipe_from_dict
    from qlora.training.build import build_model
    from qlora.training.optim import build_optimizer
    from qlora.preference import PreferenceLoss
    from qlora.inference.generate import adapters_disabled

    cfg = recipe_from_dict({"model": {"name_or_path": folder}, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                            "train": {"gradient_checkpointing": False, "device": "cpu"}})
    model = build_model(cfg, runtime.setup("cpu", "bf16", None))
    loss_fn = PreferenceLoss(model, "dpo", PreferenceConfig(beta=0.1), lambda: adapters_disabled(model))
    optimizer = build_optimizer(model, cfg.optim)

    def step(examples: list[dict]) -> torch.Tensor:
        loss_sum, n = loss_fn(**collate_preference(examples, pad_id=0))
        return loss_sum / n

    return step, optimizer, model


def _peer(folder: str, tokenizer):
    import bitsandbytes as bnb
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"), report_to=[], use_cpu=True, beta=0.1, bf16=True,
                     gradient_checkpointing=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    dummy = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer, peft_config=lora)
    trainer.model.train()
    collate = DataCollatorForPreference(pad_token_id=0)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=5e-4)

    def step(examples: list[dict]) -> torch.Tensor:
        return trainer.compute_loss(trainer.model, collate(examples))

    return step, optimizer, trainer.model


def child(which: str, args: argparse.Namespace) -> dict:
    import bitsandbytes  # noqa: F401  the same imports in both children
    import peft  # noqa: F401
    import trl  # noqa: F401

    import qlora.training.loop  # noqa: F401
    from qlora.hf.folder import load_tokenizer, model_folder
    from qlora.memory.profile import RssSampler, rss_anon_bytes

    torch.set_num_threads(2)
    torch.manual_seed(0)
    baseline = rss_anon_bytes()
    folder = str(model_folder(args.model))
    tokenizer = load_tokenizer(folder)
    step, optimizer, model = _ours(folder) if which == "ours" else _peer(folder, tokenizer)
    batches = _batches(args, len(tokenizer))
    phase = ["idle"]
    sampler = RssSampler(interval_s=0.005, phase=lambda: phase[0]).start()
    steps = []
    for examples in batches:
        phase[0] = "train"
        t0 = time.perf_counter()
        loss = step(examples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"seconds": time.perf_counter() - t0, "loss": float(loss),
                      "tokens": 2 * sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples)})
    sampler.stop()
    peak = max((s[1] for s in sampler.samples if s[2] == "train"), default=0)
    return {"stack": which, "steps": steps, "rss_anon_after_imports": baseline, "peak_rss_anon_train": peak}


def summarise(result: dict) -> dict:
    timed = result["steps"][1:] or result["steps"]
    return {"median_step_s": statistics.median(s["seconds"] for s in timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
            "peak_train_mb": (result["peak_rss_anon_train"] - result["rss_anon_after_imports"]) / MB,
            "first_loss": result["steps"][0]["loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    passed = [f"--model={args.model}", f"--steps={args.steps}", f"--pairs={args.pairs}", f"--length={args.length}"]
    summary = {}
    for which in ("ours", "peer"):
        print(f"{which}: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        summary[which] = summarise(run_child(which, passed, __file__))
    ours, peer = summary["ours"], summary["peer"]
    print(f"{'':<36}{'ours':>10}{'TRL':>10}  ratio")
    print(f"{'median step, steps 2..N (s)':<36}{ours['median_step_s']:>10.2f}{peer['median_step_s']:>10.2f}  "
          f"{peer['median_step_s'] / ours['median_step_s']:.2f}x faster")
    print(f"{'tokens/s, steps 2..N':<36}{ours['tokens_per_s']:>10.0f}{peer['tokens_per_s']:>10.0f}  "
          f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    print(f"{'peak RssAnon in steps over imports (MB)':<36}{ours['peak_train_mb']:>10.0f}{peer['peak_train_mb']:>10.0f}  "
          f"{ours['peak_train_mb'] / peer['peak_train_mb']:.2f}x the peer's")
    print(f"{'DPO loss, step 1 (log 2 = 0.6931)':<36}{ours['first_loss']:>10.4f}{peer['first_loss']:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
