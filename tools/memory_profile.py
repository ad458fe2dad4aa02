"""Profile the memory of a few training steps of a recipe, per phase, beside the planner's prediction.

    python tools/memory_profile.py RECIPE [section.field=value ...] [--steps 3] [--out DIR]

Runs `qlora.training.loop.train` on the recipe (train.max_steps=--steps, output.dir=DIR/run, overwrite) with
a `qlora.memory.profile.MemoryTracker` as its phase callback and records, per phase (load, eval,
forward, backward, optimizer, save):
  * anonymous RSS, sampled every --interval-ms (what the process holds privately, runtime included);
  * live tensor bytes, exact at op granularity, attributed to 4-bit weights, unquantised weights, LoRA
    parameters, LoRA gradients, optimiser states and activations (everything else a step creates:
    saved activations, logits, gradients in flight, dequantised weights, batches); see
    `qlora.memory.profile` for how;
  * on CUDA also the allocator's max allocated / reserved bytes, and a memory snapshot
    (`torch.cuda.memory._record_memory_history` + `_dump_snapshot`, viewable at pytorch.org/memory_viz).
Writes DIR/memory.json (timeline, per-phase peaks, breakdowns, the plan) and DIR/memory_timeline.png
(needs matplotlib: `pip install -e '.[plot]'`), and prints a table. The planner (`qlora memory`)
predicts tensor bytes, so its total is compared with the tensor peak of a training step, not with
RSS (which adds the interpreter and libraries: compare RSS with the plan plus the import baseline).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

MB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="recipe overrides")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps to run (default 3)")
    p.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    p.add_argument("--interval-ms", type=float, default=5.0, help="RSS sampling interval (default 5 ms)")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    if args.interval_ms <= 0:
        p.error(f"--interval-ms must be positive, got {args.interval_ms}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qlora.errors import UsageError

    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from qlora.recipe import load_recipe, recipe_to_dict
    from qlora.io import write_json_atomic
    from qlora.memory.profile import MemoryTracker, compare_with_plan
    from qlora.training.loop import train

    out = args.out or Path(tempfile.mkdtemp(prefix="qlora-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*args.overrides, f"train.max_steps={args.steps}", f"output.dir={out / 'run'}", "output.overwrite=true"]
    cfg = load_recipe(args.recipe, overrides)
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    snapshot = _start_cuda_history() if cuda else False

    with MemoryTracker(interval_s=args.interval_ms / 1000, cuda=cuda) as tracker:
        train(cfg, phase=tracker.phase)
    summary = tracker.summary()
    if snapshot:
        torch.cuda.memory._dump_snapshot(str(out / "cuda_memory_snapshot.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
        summary["cuda_snapshot"] = str(out / "cuda_memory_snapshot.pickle")
    comparison = compare_with_plan(cfg, summary, device="cuda" if cuda else "cpu")

    write_json_atomic(out / "memory.json", {"recipe": str(args.recipe), "overrides": overrides,
                                            "config": recipe_to_dict(cfg), "summary": summary,
                                            "plan": comparison, "timeline": tracker.timeline()})
    print(format_report(summary, comparison))
    print(f"wrote {out / 'memory.json'}")
    png = plot_timeline(tracker.timeline(), summary, comparison, out / "memory_timeline.png")
    if png:
        print(f"wrote {png}")
    return 0


def _start_cuda_history() -> bool:
    import torch

    if not hasattr(torch.cuda.memory, "_record_memory_history"):
        return False
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    return True


# ------------------------------------------------------------------------------------------ output


def format_report(summary: dict, comparison: dict) -> str:
    """Per-phase peaks, the attribution at the training-step peak, and the plan beside it."""
    phases = summary["phases"]
    cuda = any("cuda_max_allocated_bytes" in p for p in phases.values())
    head = f"{'phase':<10} {'calls':>5} {'seconds':>8} {'tensor peak MB':>15} {'RssAnon peak MB':>16}"
    lines = [head + ("  cuda alloc / reserved MB" if cuda else "")]
    for name, p in phases.items():
        if not p["calls"]:
            continue
        line = (f"{name:<10} {p['calls']:>5} {p['seconds']:>8.2f} {p['tensor_peak_bytes'] / MB:>15.1f} "
                f"{p['rss_anon_peak_bytes'] / MB:>16.1f}")
        if "cuda_max_allocated_bytes" in p:
            line += f"  {p['cuda_max_allocated_bytes'] / MB:.1f} / {p['cuda_max_reserved_bytes'] / MB:.1f}"
        lines.append(line)
    step_phase = summary["train_step_peak_phase"]
    at_peak = phases[step_phase]["tensor_breakdown_at_peak"]
    plans = [k for k in ("recipe", "largest_batch_seen") if k in comparison]
    lines += ["", f"training-step tensor peak (in {step_phase}), by category, beside the plan (MB):",
              f"{'category':<20} {'measured':>10}" + "".join(f" {'plan:' + k:>24}" for k in plans)]
    for cat, value in at_peak.items():
        lines.append(f"{cat:<20} {value / MB:>10.1f}"
                     + "".join(f" {comparison[k]['by_category'][cat] / MB:>24.1f}" for k in plans))
    measured = comparison["measured_train_step_peak_bytes"]
    lines.append(f"{'total':<20} {measured / MB:>10.1f}" + "".join(f" {comparison[k]['total_bytes'] / MB:>24.1f}" for k in plans))
    lines.append(f"{'plan / measured':<20} {'':>10}"
                 + "".join(f" {comparison[k]['ratio_plan_over_measured']:>24.3f}" for k in plans))
    for k in plans:
        s = comparison[k]["settings"]
        targets = "every token a target" if s["target_tokens"] is None else f"{s['target_tokens']} loss targets"
        lines.append(f"  plan:{k}: micro-batch {s['micro_batch']} x {s['seq_len']} tokens, {targets}")
    lines += ["", f"RssAnon: {summary['rss_anon_start_bytes'] / MB:.0f} MB at start (imports), peak "
              f"{summary['rss_anon_peak_bytes'] / MB:.0f} MB; tensor peak over the whole run "
              f"{summary['tensor_peak_bytes'] / MB:.1f} MB"]
    return "\n".join(lines)


def plot_timeline(timeline: dict, summary: dict, comparison: dict, path: Path) -> Path | None:
    """RssAnon and live tensor bytes over time, phases shaded, the plan's total as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("memory_timeline.png skipped: matplotlib is not installed (pip install -e '.[plot]')")
        return None
    t, phase = timeline["t_s"], timeline["phase"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(t, [b / MB for b in timeline["rss_anon_bytes"]], label="RssAnon (sampled)", lw=1.2)
    ax.plot(t, [b / MB for b in timeline["tensor_bytes"]], label="live tensors", lw=1.2)
    ax.axhline(comparison["recipe"]["total_bytes"] / MB, ls="--", color="gray", lw=1, label="plan (recipe's worst batch)")
    colours = {"load": "tab:purple", "eval": "tab:olive", "forward": "tab:blue", "backward": "tab:red",
               "optimizer": "tab:green", "save": "tab:brown"}
    start = 0
    for i in range(1, len(t) + 1):  # shade each run of samples taken in the same phase
        if i == len(t) or phase[i] != phase[start]:
            if phase[start] in colours:
                ax.axvspan(t[start], t[i - 1], color=colours[phase[start]], alpha=0.15, lw=0)
            start = i
    for name, colour in colours.items():
        if name in summary["phases"]:
            ax.axvspan(0, 0, color=colour, alpha=0.3, label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title("memory per phase")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
