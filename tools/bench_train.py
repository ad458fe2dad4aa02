#!/usr/bin/env python
"""Benchmark qlora's QLoRA training step against transformers + PEFT + bitsandbytes, in one run.

    python tools/bench_train.py [--model smollm2-135m] [--steps 12] [--grad-ckpt] [--packed] [--json PATH]

`--packed` is the packed-text workload: data.packing on, 256-token blocks (use --micro-batch 4).

Both stacks train the same LoRA (r=16, alpha 32, dropout 0.05, all linear layers) on the same NF4 +
double-quant 4-bit base, with the same micro-batches, in a fresh subprocess each (so one cannot
inherit the other's heap or thread pools):

    ours  `qlora.training.build.build_model` (stream-loaded 4-bit model + LoRA), `qlora.nn.loss.CausalLMLoss`
          (sum of token losses, chunked, never the full logits), `qlora.training.optim.build_optimizer`
          (the recipe's paged 8-bit AdamW: bitsandbytes' AdamW8bit on the CPU);
    peer  `AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(nf4,
          double quant, bf16 compute))`, `peft.prepare_model_for_kbit_training`,
          `peft.get_peft_model(LoraConfig(..., target_modules="all-linear"))`, `bnb.optim.AdamW8bit`;
          the loss is its own `model(..., labels=labels).loss` (mean over target tokens).

Data: the recipe's (default `recipes/smollm2_135m_chat_cpu.yaml`: chatterbot conversations, ChatML,
loss on answers only) through `qlora.data.make_dataloaders`, the first `--steps` train micro-batches
and the held-out eval loader. Each child builds them itself; the parent checks that both saw the
same tokens (a SHA-256 of the batches). Shared settings: micro-batch, steps, a constant lr 5e-4 (no
warmup, no schedule), gradient clipping at the recipe's max_grad_norm (`qlora.training.optim.clip_gradients`
for both), gradient checkpointing on or off for both (the peer's through PEFT's own switch),
2 threads, seed.

Per stack: load time (model + adapters), median step time over steps 2..N (step 1 pays one-off
allocations and is skipped), tokens/s over steps 2..N (non-pad input tokens / seconds), the peak
anonymous RSS (`RssAnon`, sampled every 5 ms by `qlora.memory.profile.RssSampler`) during the
training steps minus the RssAnon after the imports (both children import torch, transformers, peft,
bitsandbytes and qlora first, so the baselines are alike), and the held-out mean token loss before
and after training, computed by `qlora.inference.evaluate.evaluate` for both (the peer's mean loss times its
target-token count gives the same (sum, count) pair as ours).

Not like-for-like by design (each stack's usual path): `prepare_model_for_kbit_training` upcasts the
peer's embeddings, norms and lm_head to fp32 (fp32 logits over the full vocabulary), ours keeps them
in bf16 and computes the loss in fp32 chunks; the LoRA A initialisations and dropout masks come from
different random streams; PEFT's checkpointing (when on) is the reentrant variant, ours the
non-reentrant one.
Timings on a shared machine are only meaningful under the same load: the tool first waits for the
CPUs to be quiet (`bench_quant.wait_until_quiet`) and prints the load average before each stack.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool, when imported from elsewhere

from bench_quant import wait_until_quiet  # noqa: E402

from qlora.config import RecipeConfig  # noqa: E402
from qlora.runtime import Runtime  # noqa: E402

MB = 10**6
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_135m_chat_cpu.yaml"
LR = 5e-4
STACKS = ("ours", "peer")


# ------------------------------------------------------------------------------------ settings


def load_cfg(args: argparse.Namespace) -> RecipeConfig:
    """The recipe with this benchmark's shared settings applied."""
    from qlora.recipe import load_recipe

    overrides = [f"model.name_or_path={args.model}", f"optim.lr={LR}", "optim.scheduler=constant",
                 "optim.warmup_steps=0", f"train.micro_batch_size={args.micro_batch}",
                 f"train.max_steps={args.steps}", f"train.threads={args.threads}",
                 f"train.gradient_checkpointing={str(args.grad_ckpt).lower()}", "train.device=cpu"]
    if args.packed:
        overrides += ["data.packing=true", "data.group_by_length=false", "data.max_length=256"]
    return load_recipe(args.recipe, overrides)


def fingerprint(batches: list[dict]) -> str:
    """SHA-256 of the batches' tokens, labels and masks: equal in both children means the same data."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode())
            h.update(batch[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ the stacks


def _imports() -> None:
    """The same libraries in both children, so their post-import RssAnon baselines are alike."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qlora.training.loop  # noqa: F401


def build_ours(cfg: RecipeConfig, rt: Runtime) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(loss module returning (sum, count), optimiser) for qlora."""
    from qlora.nn.loss import CausalLMLoss
    from qlora.training.optim import build_optimizer
    from qlora.training.build import build_model

    model = build_model(cfg, rt)
    return CausalLMLoss(model, cfg.train.loss_chunk_size), build_optimizer(model, cfg.optim)


def build_peer(cfg: RecipeConfig, folder: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(loss module returning (sum, count), optimiser) for transformers + PEFT + bitsandbytes."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=lc.targets, task_type="CAUSAL_LM",
                                             target_parameters=peer_target_parameters(model, lc.target_parameters)))
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return PeerLoss(model), optimizer


def peer_target_parameters(model: nn.Module, target_parameters) -> list[str] | None:
    """PEFT's `target_parameters` for the recipe's expert targets (None for a dense recipe); the
    peer's experts stay 16-bit (bitsandbytes replaces nn.Linear only)."""
    from qlora.adapters.experts import expert_targets

    if not target_parameters:
        return None
    names = [f"{fqn.rpartition('.')[2]}.{name}" for fqn, params in expert_targets(model, target_parameters).items()
             for name in params]
    return list(dict.fromkeys(names))


class PeerLoss(nn.Module):
    """The peer's own loss as our (sum, count) pair: its mean over target tokens times their count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                target_positions: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Packed rows: position ids and no 2-D mask, transformers' own packed-sequence input (as ours).
        mask = attention_mask if position_ids is None else None
        mean = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, labels=labels,
                          use_cache=False).loss
        count = (labels[:, 1:] != -100).sum()
        return mean * count, count


def train_steps(loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], max_grad_norm: float | None,
                set_phase: Callable[[str], None]) -> list[dict]:
    """One optimiser step per micro-batch, timed; the gradient is that of the mean token loss."""
    from qlora.training.optim import clip_gradients

    loss_fn.train()
    steps = []
    for batch in batches:
        set_phase("train")
        t0 = time.perf_counter()
        loss_sum, count = loss_fn(**batch)
        (loss_sum / count).backward()
        grad_norm = float(clip_gradients(optimizer, max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        set_phase("idle")
        steps.append({"seconds": seconds, "tokens": int(batch["attention_mask"].sum()),
                      "loss": float(loss_sum) / int(count), "grad_norm": grad_norm})
    return steps


def child(which: str, args: argparse.Namespace) -> dict:
    """Run in a subprocess: load one stack, evaluate, train the first N batches, evaluate again."""
    from qlora.memory.profile import RssSampler, rss_anon_bytes

    _imports()
    from qlora import runtime
    from qlora.data import make_dataloaders
    from qlora.hf.folder import load_tokenizer, model_folder
    from qlora.inference.evaluate import evaluate

    cfg = load_cfg(args)
    rt = runtime.setup("cpu", "bf16", args.threads)
    runtime.seed_everything(cfg.train.seed)
    baseline = rss_anon_bytes()
    phase = ["load"]
    sampler = RssSampler(interval_s=0.005, phase=lambda: phase[0]).start()

    t0 = time.perf_counter()
    folder = model_folder(args.model)
    loss_fn, optimizer = build_ours(cfg, rt) if which == "ours" else build_peer(cfg, folder)
    load_s = time.perf_counter() - t0
    phase[0] = "idle"

    tokenizer = load_tokenizer(folder)
    train_loader, eval_loader, _ = make_dataloaders(tokenizer, cfg.data, cfg.train.micro_batch_size, cfg.train.seed)
    if eval_loader is None:
        raise SystemExit(f"the recipe {args.recipe} holds no eval rows out (data.eval_size)")
    loader = iter(train_loader)
    batches = [next(loader) for _ in range(args.steps)]
    eval_before = evaluate(loss_fn, eval_loader, rt, args.eval_batches)
    steps = train_steps(loss_fn, optimizer, batches, cfg.optim.max_grad_norm, lambda name: phase.__setitem__(0, name))
    eval_after = evaluate(loss_fn, eval_loader, rt, args.eval_batches)
    sampler.stop()

    peaks = {name: max((s[1] for s in sampler.samples if s[2] == name), default=0) for name in ("load", "train")}
    trainable = sum(p.numel() for p in loss_fn.parameters() if p.requires_grad)
    return {"stack": which, "load_s": load_s, "steps": steps, "batches_sha256": fingerprint(batches),
            "eval_before": eval_before, "eval_after": eval_after, "trainable_params": trainable,
            "rss_anon_after_imports": baseline, "peak_rss_anon_load": peaks["load"],
            "peak_rss_anon_train": peaks["train"], "rss_samples": len(sampler.samples)}


def run_child(which: str, argv: list[str], script: str = __file__) -> dict:
    """`script argv --child which` in a fresh process (offline); its last stdout line as JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), *argv, "--child", which], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report


def summarise(result: dict) -> dict:
    """Step time and throughput over steps 2..N (all steps when N == 1), memory over the imports."""
    timed = result["steps"][1:] or result["steps"]
    seconds = sum(s["seconds"] for s in timed)
    return {"load_s": result["load_s"],
            "median_step_s": statistics.median(s["seconds"] for s in timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
            "peak_train_mb": (result["peak_rss_anon_train"] - result["rss_anon_after_imports"]) / MB,
            "imports_mb": result["rss_anon_after_imports"] / MB,
            "eval_before": result["eval_before"]["eval_loss"], "eval_after": result["eval_after"]["eval_loss"],
            "first_loss": result["steps"][0]["loss"], "last_loss": result["steps"][-1]["loss"]}


def report(summary: dict[str, dict]) -> str:
    ours, peer = summary["ours"], summary["peer"]
    rows = [("load (s)", "load_s", "{:.2f}", peer["load_s"] / ours["load_s"], "x faster"),
            ("median step, steps 2..N (s)", "median_step_s", "{:.3f}", peer["median_step_s"] / ours["median_step_s"],
             "x faster"),
            ("tokens/s, steps 2..N", "tokens_per_s", "{:.0f}", ours["tokens_per_s"] / peer["tokens_per_s"],
             "x (speed-up)"),
            ("peak RssAnon in training over imports (MB)", "peak_train_mb", "{:.0f}",
             ours["peak_train_mb"] / peer["peak_train_mb"], "x the peer's memory"),
            ("RssAnon after imports (MB)", "imports_mb", "{:.0f}", None, ""),
            ("train loss, step 1", "first_loss", "{:.4f}", None, ""),
            ("train loss, step N", "last_loss", "{:.4f}", None, ""),
            ("held-out loss before", "eval_before", "{:.4f}", None, ""),
            ("held-out loss after", "eval_after", "{:.4f}", None, "")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'ours':>10}  {'peer':>10}  ratio", "-" * (width + 40)]
    for label, key, fmt, ratio, unit in rows:
        tail = f"{ratio:.2f} {unit}" if ratio is not None else ""
        lines.append(f"{label:<{width}}  {fmt.format(ours[key]):>10}  {fmt.format(peer[key]):>10}  {tail}")
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name, model folder or cached hub id")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe for data, LoRA and optimiser settings")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps (one micro-batch each); step 1 untimed")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each stack")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing for both stacks (default off, as in the recipe)")
    p.add_argument("--packed", action="store_true", help="pack the data into 256-token blocks (no padding)")
    p.add_argument("--eval-batches", type=int, default=None, help="cap the held-out micro-batches (default: all)")
    p.add_argument("--max-busy", type=float, default=0.25, help="CPU fraction used by others that counts as quiet")
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "micro_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an int >= 1")
    if args.eval_batches is not None and args.eval_batches < 1:
        p.error(f"--eval-batches {args.eval_batches}: expected an int >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    print(f"load average {load_average()}; {wait_until_quiet(args.max_busy, args.max_wait)}", flush=True)
    results, loads = {}, {}
    for which in STACKS:
        loads[which] = load_average()
        print(f"{which}: {args.steps} steps of micro-batch {args.micro_batch} on {args.model} "
              f"(load average {loads[which]})", flush=True)
        results[which] = run_child(which, argv)
    loads["end"] = load_average()
    if results["ours"]["batches_sha256"] != results["peer"]["batches_sha256"]:
        raise RuntimeError("the two stacks trained on different batches: "
                           f"{results['ours']['batches_sha256']} vs {results['peer']['batches_sha256']}")
    summary = {which: summarise(r) for which, r in results.items()}
    print(f"load average at the end {loads['end']}; gradient checkpointing "
          f"{'on' if args.grad_ckpt else 'off'}; trainable params ours {results['ours']['trainable_params']:,}, "
          f"peer {results['peer']['trainable_params']:,}")
    print(report(summary))
    if args.json:
        from qlora.io import write_json_atomic

        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
        write_json_atomic(args.json, {"settings": {**settings, "lr": LR}, "load_average": loads,
                                      "summary": summary, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
