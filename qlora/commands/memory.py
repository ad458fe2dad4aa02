"""`qlora memory MODEL`: plan the peak memory of a QLoRA training step and say if it fits a GPU.

MODEL is a built-in name (`llama-65b`, `qwen2.5-7b`, ...; see `qlora memory --help`) or a path to
a LLaMA-style `config.json`. Prints an itemised table; `--json PATH` writes the same numbers
(including `total_bytes` and `fits`). GPU sizes are GiB, as CUDA reports them (a "48 GB" card
has 48 GiB).
"""

from __future__ import annotations

import argparse

from qlora.io import write_json_atomic
from qlora.memory import BUILTIN_MODELS, GIB, LINEAR_NAMES, MemoryPlan, PlanSettings, plan_memory, model_shape
from qlora.memory.plan import ATTENTION, BLOCKSIZES, DEVICES, DTYPE_BYTES, LOSSES, OPTIMIZERS, QUANT_TYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="plan the peak memory of a QLoRA training step",
        description="Itemised peak memory of one QLoRA training step (4-bit weights, LoRA, optimiser, "
                    "activations, logits, workspace, overhead) and whether it fits a GPU. "
                    f"Built-in models: {', '.join(BUILTIN_MODELS)}.")
    p.add_argument("model", metavar="MODEL", help="built-in model name or path to a config.json")
    p.add_argument("--lora-r", type=_positive_int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--lora-targets", type=_targets, default=LINEAR_NAMES, metavar="NAMES",
                   help="comma-separated linear layers or 'all-linear' (default)")
    p.add_argument("--lora-dropout", type=_fraction, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="sequence length (default 512)")
    p.add_argument("--batch", type=_positive_int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="disable gradient checkpointing")
    p.add_argument("--optim", choices=OPTIMIZERS, default="paged_adamw_8bit", help="optimiser (default paged_adamw_8bit)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--lora-dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="adapter dtype (default bf16)")
    p.add_argument("--quant", choices=QUANT_TYPES, default="nf4", help="4-bit format (default nf4)")
    p.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64, help="quantisation block (default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="fp32 absmax per block")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="sdpa keeps no seq x seq scores; eager does (default sdpa)")
    p.add_argument("--loss", choices=LOSSES, default="full", help="full logits or chunked loss (default full)")
    p.add_argument("--loss-chunk", type=_positive_int, default=1024, help="tokens per chunk for --loss chunked")
    p.add_argument("--device", choices=DEVICES, default="cuda", help="cuda adds the CUDA context (default cuda)")
    p.add_argument("--gpu-gb", type=_positive_float, default=48.0, help="GPU memory in GiB (default 48)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = PlanSettings(
        lora_r=args.lora_r, lora_targets=args.lora_targets, lora_dropout=args.lora_dropout,
        lora_dtype=args.lora_dtype, seq_len=args.seq_len, micro_batch=args.batch,
        grad_checkpointing=args.grad_ckpt, optimizer=args.optim, compute_dtype=args.dtype,
        quant_type=args.quant, blocksize=args.blocksize, double_quant=args.double_quant,
        attention=args.attention, loss=args.loss, loss_chunk=args.loss_chunk, device=args.device)
    plan = plan_memory(model_shape(args.model), settings)
    gpu_bytes = int(args.gpu_gb * GIB)
    print(format_table(plan, gpu_bytes))
    if args.json:
        write_json_atomic(args.json, plan.to_dict(gpu_bytes))
    return 0


def format_table(plan: MemoryPlan, gpu_bytes: int) -> str:
    """The plan as a fixed-width table with totals, the GPU verdict and the checkpointing trade."""
    m, s, d = plan.model, plan.settings, plan.details
    lines = [f"{m.name}: {d['parameters'] / 1e9:.3f}B params ({d['quantised_parameters'] / 1e9:.3f}B in 4-bit), "
             f"LoRA {d['lora_parameters'] / 1e6:.1f}M params; micro-batch {s.micro_batch} x {s.seq_len} tokens, "
             f"{s.compute_dtype}, {s.device}",
             f"{'item':<20} {'bytes':>16} {'GiB':>8} {'share':>6}  what"]
    total = plan.total_bytes
    for name, nbytes in plan.breakdown.items():
        lines.append(f"{name:<20} {nbytes:>16,} {nbytes / GIB:>8.3f} {nbytes / total:>6.1%}  {plan.notes[name]}")
    lines.append(f"{'total':<20} {total:>16,} {total / GIB:>8.3f} {1:>6.0%}")
    verdict = "fits" if plan.fits(gpu_bytes) else "does NOT fit"
    lines.append(f"GPU {gpu_bytes / GIB:g} GiB: {verdict}, margin {plan.margin_bytes(gpu_bytes) / GIB:+.3f} GiB")
    lines.append(f"activations: {d['activations_with_checkpointing_bytes'] / GIB:.3f} GiB with gradient checkpointing, "
                 f"{d['activations_without_checkpointing_bytes'] / GIB:.3f} GiB without")
    return "\n".join(lines)


def _checked(cast, ok, allowed: str):
    """An argparse `type=` that parses with `cast` and accepts values where `ok(value)`."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _targets(text: str) -> tuple[str, ...]:
    if text == "all-linear":
        return LINEAR_NAMES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in LINEAR_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or repr(text)}; use 'all-linear' or names from {', '.join(LINEAR_NAMES)}")
    return names
