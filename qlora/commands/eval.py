"""`qlora eval TARGET [k=v ...]`: loss and perplexity of a model (+ adapter) on a data set.

Evaluate TARGET (a run folder, a recipe file, or a model name/folder) on the recipe's held-out
split (--split eval) or its training split. A run folder's adapter is used unless --base. Several
--adapter NAME=DIR are scored one after another on one load of the base (one line each; with
--json, a list of results).
"""

from __future__ import annotations

import argparse
import sys

from qlora.inference.target import add_target_arguments


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="loss / perplexity of a model or model + adapter", description=__doc__.split("\n\n", 1)[1])
    add_target_arguments(p)
    p.add_argument("--split", choices=("eval", "train"), default="eval", help="which split (default: eval)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="evaluate at most N micro-batches (default: the recipe's train.eval_steps)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora import runtime
    from qlora.data.preference import objective_loaders
    from qlora.data.rows import load_rows
    from qlora.errors import UsageError
    from qlora.inference.target import load_for_inference, resolve_target
    from qlora.io import write_json_atomic
    from qlora.display import EvalProgress
    from qlora.inference.evaluate import evaluate
    from qlora.preference import describe, eval_loss_for, preference_metrics

    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError(f"--max-batches must be >= 1, got {args.max_batches}")
    target = resolve_target(args.target, args.overrides, args.adapter, args.base)
    cfg = target.cfg
    rt = runtime.setup(cfg.train.device, cfg.model.dtype, cfg.train.threads)
    model, tokenizer, adapters = load_for_inference(target, rt.device)
    print(target.describe(model), file=sys.stderr, flush=True)
    rows = load_rows(cfg.data)
    train_loader, eval_loader, stats = objective_loaders(tokenizer, cfg.data, cfg.train.objective,
                                                         cfg.train.micro_batch_size, cfg.train.seed, rows)
    loader = eval_loader if args.split == "eval" else train_loader
    if loader is None:
        raise UsageError("the recipe holds out no eval rows (data.eval_size / eval_fraction); use --split train")
    max_batches = args.max_batches if args.max_batches is not None else cfg.train.eval_steps
    print(held_out_line(cfg.data, args.split, stats), file=sys.stderr, flush=True)
    results = []
    for name in list(target.adapters) or [None]:
        adapters.set_adapter(name)
        loss_fn = eval_loss_for(cfg, model, adapters)  # the objective's loss (a preference one: its reference)
        progress = EvalProgress(min(len(loader), max_batches or len(loader)), f"eval {name}" if name else "eval")
        result = {**evaluate(loss_fn, loader, rt, max_batches, progress),
                  **preference_metrics(loss_fn, rt, training=False)}
        progress.close()
        folder = str(target.adapters[name]) if name else None
        result.update(model=cfg.model.name_or_path, adapter=folder, split=args.split, dataset=cfg.data.dataset)
        print(f"{cfg.model.name_or_path}{' + ' + folder if folder else ''} on "
              f"{cfg.data.dataset} ({args.split}, {result['eval_tokens']} tokens): "
              f"loss {result['eval_loss']:.4f}  perplexity {result['eval_ppl']:.3f}{describe(result)}", flush=True)
        results.append(result)
    if args.json:
        write_json_atomic(args.json, results[0] if len(results) == 1 else {"results": results})
    return 0


def held_out_line(data, split: str, stats) -> str:
    """Which rows are scored: the data set, how the held-out part is drawn, its size."""
    if data.eval_dataset:
        how = f"data.eval_dataset={data.eval_dataset}"
    elif data.eval_size is not None:
        how = f"data.eval_size={data.eval_size}, data.seed={data.seed}"
    else:
        how = f"data.eval_fraction={data.eval_fraction:g}, data.seed={data.seed}"
    examples = stats.eval_examples if split == "eval" else stats.train_examples
    return (f"scoring the {split} split of {data.dataset or 'data.datasets'} ({how}): {examples} examples; "
            f"{stats.rows} rows read, {stats.skipped_summary()}")
