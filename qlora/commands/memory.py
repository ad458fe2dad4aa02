"""`qlora memory MODEL|RECIPE`: plan the peak memory of a QLoRA training step and say if it fits a GPU.

MODEL is a built-in name (`llama-65b`, `qwen2.5-7b`, `mixtral-8x7b`, ...; see `qlora memory --help`)
or a path to a LLaMA-style or mixture-of-experts `config.json` (`qlora.memory.moe`); a near miss
(`llama3_8b`) gets a did-you-mean. RECIPE (a .yaml file, with `key=value` overrides as for
`qlora train`) plans exactly what `qlora train RECIPE` would run: its LoRA (expert LoRA too),
quantisation, batch, sequence length, checkpointing, optimiser and loss; planner options that the
recipe decides are refused there. The defaults of the options follow the
trainer's (chunked loss of 1024 tokens). Prints an itemised table; `--json PATH` writes the same
numbers (including `total_bytes` and `fits`). GPU sizes are GiB, as CUDA reports them (a "48 GB"
card has 48 GiB). With a RECIPE, the device is its `train.device` (`auto` plans cuda) and the GPU
size the budget in its file name (`llama3_8b_qlora_24gb.yaml`: 24 GiB), unless --device / --gpu-gb
say otherwise; a CPU plan is the tensor peak in RAM and checks no GPU.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qlora.errors import UsageError
from qlora.io import write_json_atomic
from qlora.memory import BUILTIN_MODELS, GIB, LINEAR_NAMES, MemoryPlan, PlanSettings, plan_memory, model_shape
from qlora.memory.plan import ATTENTION, BLOCKSIZES, DEVICES, DTYPE_BYTES, LOSSES, OPTIMIZERS, QUANT_TYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="plan the peak memory of a QLoRA training step",
        description="Itemised peak memory of one QLoRA training step (4-bit weights, LoRA, optimiser, "
                    "activations, logits, workspace, overhead) and whether it fits a GPU. "
                    f"Built-in models: {', '.join(BUILTIN_MODELS)}.")
    p.add_argument("model", metavar="MODEL|RECIPE",
                   help="built-in model name, path to a config.json, or a training recipe (.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--model", dest="shape", metavar="NAME", help="with a recipe: plan this built-in model or "
                   "config.json instead of the recipe's model.name_or_path")
    for flag, kwargs in PLAN_OPTIONS.items():
        p.add_argument(flag, **{**kwargs, "default": None})
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="cuda adds the CUDA context (default: a recipe's train.device, else cuda)")
    p.add_argument("--gpu-gb", type=_positive_float, default=None,
                   help="GPU memory in GiB (default: the budget in a recipe's file name, e.g. _24gb, else 48)")
    p.add_argument("--max-seq-len", action="store_true", help="also print the longest sequence that fits "
                   "--gpu-gb, with and without activation offloading (train.offload_activations)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    planner = plan_memory
    if args.model.endswith((".yaml", ".yml")):
        shape, settings, note, planner = _from_recipe(args)
    else:
        args.gpu_given = args.gpu_gb is not None
        args.device, args.gpu_gb = args.device or "cuda", args.gpu_gb or DEFAULT_GPU_GB
        if args.overrides or args.shape:
            raise UsageError(f"KEY=VALUE overrides and --model need a recipe (.yaml), not MODEL {args.model!r}")
        options = {dest: default if getattr(args, dest) is None else getattr(args, dest)
                   for dest, default in _DEFAULTS.items()}
        shape, note = model_shape(args.model), ""
        settings = PlanSettings(
            lora_r=options["lora_r"], lora_targets=options["lora_targets"], lora_dropout=options["lora_dropout"],
            lora_target_parameters=options["lora_target_parameters"],
            lora_dtype=options["lora_dtype"], seq_len=options["seq_len"], micro_batch=options["batch"],
            grad_checkpointing=options["grad_ckpt"], optimizer=options["optim"], compute_dtype=options["dtype"],
            quant_type=options["quant"], blocksize=options["blocksize"], double_quant=options["double_quant"],
            attention=options["attention"], loss=options["loss"], loss_chunk=options["loss_chunk"],
            offload_activations=options["offload"], device=args.device)
    plan = planner(shape, settings)
    gpu_bytes = int(args.gpu_gb * GIB)
    if note:
        print(f"{args.model}: {note}")
    table = format_table(plan, gpu_bytes)
    if settings.device == "cpu" and not args.gpu_given:  # no GPU to fit: the total is RAM
        table = re.sub(r"(?m)^GPU .*$", "device cpu: no GPU budget checked (the total is the tensor peak in RAM; "
                                        "--gpu-gb N checks one)", table)
    print(table)
    if args.max_seq_len:
        from qlora.memory.long_context import longest_sequences

        print(longest_sequences(shape, settings, gpu_bytes))
    if args.json:
        write_json_atomic(args.json, plan.to_dict(gpu_bytes))
    return 0


def _from_recipe(args: argparse.Namespace):
    """(shape, settings, note, planner) for `qlora memory RECIPE`: the recipe's own settings, nothing
    else; a preference objective's planner counts its rows and reference pass (qlora.memory.preference)."""
    from qlora.memory.from_recipe import recipe_shape, settings_from_recipe
    from qlora.memory.preference import planner_for
    from qlora.recipe import load_recipe

    given = [flag for flag, kwargs in PLAN_OPTIONS.items() if getattr(args, _dest(flag, kwargs)) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: the recipe decides these; change them with recipe overrides "
                         "(e.g. lora.r=8 train.micro_batch_size=2 data.max_length=1024)")
    recipe = load_recipe(args.model, list(args.overrides))
    if args.shape:
        shape, note = model_shape(args.shape), f"shape of {args.shape} (--model)"
    else:
        shape, note = recipe_shape(recipe)
    budget = _recipe_budget(args, recipe)
    settings = settings_from_recipe(recipe, device=args.device)
    objective = "" if recipe.train.objective == "sft" else f", objective {recipe.train.objective}"
    return shape, settings, f"{note}\n{budget}\n{_describe(recipe, settings)}{objective}", planner_for(recipe)


DEFAULT_GPU_GB = 48.0
_NAME_BUDGET = re.compile(r"(?:^|_)(\d+(?:\.\d+)?)gb(?:_|$)")


def _recipe_budget(args: argparse.Namespace, recipe) -> str:
    """Fill in args.device / args.gpu_gb from the recipe where not given; returns where each came from."""
    args.gpu_given = args.gpu_gb is not None
    if args.device is None:
        device = recipe.train.device
        args.device = "cuda" if device == "auto" else device
        where = f"device {args.device} (train.device{': auto plans cuda' if device == 'auto' else ''})"
    else:
        where = f"device {args.device} (--device)"
    if args.gpu_gb is None:
        found = _NAME_BUDGET.search(Path(args.model).stem.lower())
        args.gpu_gb = float(found.group(1)) if found else DEFAULT_GPU_GB
        gpu = f"GPU {args.gpu_gb:g} GiB ({'the recipe name' if found else 'the default; --gpu-gb N sets it'})"
    else:
        gpu = f"GPU {args.gpu_gb:g} GiB (--gpu-gb)"
    return f"{where}, {gpu}" if args.device == "cuda" or args.gpu_given else where


def _describe(recipe, s: PlanSettings) -> str:
    loss = f"chunked loss ({s.loss_chunk} tokens)" if s.loss == "chunked" else "full-logits loss"
    experts = f" and experts ({','.join(s.lora_target_parameters)})" if s.lora_target_parameters else ""
    return (f"as `qlora train` runs it: LoRA r={s.lora_r} on {','.join(s.lora_targets)}{experts}, "
            f"{s.quant_type}{' + double quant' if s.double_quant else ''} block {s.blocksize}, "
            f"{s.optimizer}, gradient checkpointing {'on' if s.grad_checkpointing else 'off'}"
            f"{' + activation offloading' if s.offload_activations else ''}, {loss}, "
            f"{s.attention} attention")


def format_table(plan: MemoryPlan, gpu_bytes: int) -> str:
    """The plan as a fixed-width table with totals, the GPU verdict and the checkpointing trade."""
    m, s, d = plan.model, plan.settings, plan.details
    lines = [f"{m.name}: {d['parameters'] / 1e9:.3f}B params ({d['quantised_parameters'] / 1e9:.3f}B in 4-bit), "
             f"LoRA {d['lora_parameters'] / 1e6:.1f}M params; micro-batch {s.micro_batch} x {s.seq_len} tokens, "
             f"{s.compute_dtype}, {s.device}",
             *([f"mixture of experts: {d['active_parameters'] / 1e9:.3f}B active per token (lm_head included, input "
                f"embedding not), {d['routed_token_passes']:,} routed token passes"] if "active_parameters" in d else []),
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


PLAN_OPTIONS = {  # planner options for a bare MODEL (a recipe sets them itself); defaults in _DEFAULTS
    "--lora-r": dict(type=_positive_int, help="LoRA rank (default 64)"),
    "--lora-targets": dict(type=lambda text: _targets(text), metavar="NAMES",
                           help="comma-separated linear layers or 'all-linear' (default)"),
    "--lora-dropout": dict(type=_fraction, help="LoRA dropout (default 0)"),
    "--lora-target-parameters": dict(type=lambda text: tuple(n.strip() for n in text.split(",") if n.strip()),
                                     metavar="NAMES", help="MoE: 'all-experts' or comma-separated fused expert "
                                     "parameters (mlp.experts.gate_up_proj,...) with LoRA (default none)"),
    "--seq-len": dict(type=_positive_int, help="sequence length (default 512)"),
    "--batch": dict(type=_positive_int, help="micro-batch size (default 1)"),
    "--no-grad-ckpt": dict(dest="grad_ckpt", action="store_const", const=False, help="disable gradient checkpointing"),
    "--optim": dict(choices=OPTIMIZERS, help="optimiser (default paged_adamw_8bit)"),
    "--dtype": dict(choices=tuple(DTYPE_BYTES), help="compute dtype (default bf16)"),
    "--lora-dtype": dict(choices=tuple(DTYPE_BYTES), help="adapter dtype (default bf16)"),
    "--quant": dict(choices=QUANT_TYPES, help="4-bit format (default nf4)"),
    "--blocksize": dict(type=int, choices=BLOCKSIZES, help="quantisation block (default 64)"),
    "--no-double-quant": dict(dest="double_quant", action="store_const", const=False, help="fp32 absmax per block"),
    "--attention": dict(choices=ATTENTION, help="sdpa keeps no seq x seq scores; eager does (default sdpa)"),
    "--loss": dict(choices=LOSSES, help="chunked loss (the trainer's default, train.loss_chunk_size) or full "
                                        "logits (default chunked)"),
    "--loss-chunk": dict(type=_positive_int, help="tokens per chunk for --loss chunked (default 1024)"),
    "--offload-activations": dict(dest="offload", action="store_const", const=True,
                                  help="checkpointed layer inputs in host memory (train.offload_activations)"),
}
_DEFAULTS = dict(lora_r=64, lora_targets=LINEAR_NAMES, lora_dropout=0.0, lora_target_parameters=(), seq_len=512,
                 batch=1, grad_ckpt=True, optim="paged_adamw_8bit", dtype="bf16", lora_dtype="bf16", quant="nf4", blocksize=64,
                 double_quant=True, attention="sdpa", loss="chunked", loss_chunk=1024, offload=False)


def _dest(flag: str, kwargs: dict) -> str:
    return kwargs.get("dest", flag.lstrip("-").replace("-", "_"))


def _targets(text: str) -> tuple[str, ...]:
    if text == "all-linear":
        return LINEAR_NAMES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in LINEAR_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or repr(text)}; use 'all-linear' or names from {', '.join(LINEAR_NAMES)}")
    return names
