"""`qlora train RECIPE [section.key=value ...]`: fine-tune with a YAML recipe."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with a recipe",
                              description="Fine-tune with QLoRA. Overrides use the recipe's keys, "
                                          "e.g. train.max_steps=10 lora.r=8.")
    p.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output.dir")
    p.add_argument("--samples", type=int, default=3, metavar="N",
                   help="after training, answer N held-out prompts with the base and the tuned model (default 3)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora.recipe import load_recipe
    from qlora.errors import UsageError
    from qlora.io import write_json_atomic
    from qlora.data.rows import load_rows
    from qlora.run_dir import RunDir

    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    cfg = load_recipe(args.recipe, overrides)
    rows = load_rows(cfg.data)  # every row checked before torch and the model load: bad data fails in ~1 s
    from qlora.training.loop import train

    summary = train(cfg, resume=args.resume, samples=args.samples, rows=rows)
    if "adapter" in summary:  # main process
        print_summary(summary)
        write_json_atomic(RunDir(summary["run_dir"]).summary, summary)
    return 0


def print_summary(summary: dict) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print()
    if before and after:
        print(f"eval loss: {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}   "
              f"perplexity: {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}")
    elif after:
        print(f"eval loss: {after['eval_loss']:.4f}   perplexity: {after['eval_ppl']:.2f}")
    if after and "eval_rewards/accuracies" in after:  # a preference objective (TRL's metric names)
        was = f"{before['eval_rewards/accuracies']:.3f} -> " if before else ""
        margin = f"{before['eval_rewards/margins']:.4f} -> " if before else ""
        print(f"held-out reward accuracy: {was}{after['eval_rewards/accuracies']:.3f}   "
              f"margin: {margin}{after['eval_rewards/margins']:.4f}")
    stopped = summary.get("stopped_early_at")
    steps = f"{stopped} of {summary['total_steps']} steps (early stopping)" if stopped else f"{summary['total_steps']} steps"
    best = summary.get("best")
    kept = f" (best eval, step {best['step']})" if best else ""
    print(f"trained {steps} at {summary['train_tokens_per_s']:.0f} tokens/s; adapter{kept}: {summary['adapter']}")
    for s in summary.get("samples", []):
        reference = f"\n  reference (held-out row): {s['reference']}" if s.get("reference") else ""
        print(f"\n> {s['prompt']}{reference}\n  before: {s['before']}\n  after:  {s['after']}")
