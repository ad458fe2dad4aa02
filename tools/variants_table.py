"""The LoRA-variant table: the main job once per variant, held-out loss before and after, load time,
step time and peak memory, each against plain QLoRA measured in the same invocation.

    python tools/variants_table.py [--steps 150] [--threads 1] [--only qlora,adalora] [--out DIR]

Every variant is `qlora train recipes/smollm2_135m_chat_cpu.yaml` (same data, steps and seed) with
the overrides below, run as its own process one after another. Held-out loss: the run's
summary.json (eval before training = step 0, after = the end). Load: the trainer's "loaded in"
line (stream-load, quantise, and for LoftQ / PiSSA the per-layer SVDs). Step: the median
`step_time_s` of metrics.jsonl. Peak memory: the process's peak resident set (`ru_maxrss` from
wait4), whole run. Times depend on what else the machine runs: the table prints the load average
seen before each run, and ratios against QLoRA are only as good as the load was even.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2_135m_chat_cpu.yaml"

VARIANTS: dict[str, list[str]] = {
    "lora-16bit": ["quant.enabled=false"],
    "qlora": [],
    "loftq-1": ["lora.init=loftq", "lora.loftq_iters=1"],
    "loftq-5": ["lora.init=loftq", "lora.loftq_iters=5"],
    "qpissa": ["lora.init=pissa"],
    "qdora": ["lora.use_dora=true"],
    "adalora": ["lora.use_adalora=true", "lora.target_r=8", "lora.tinit=10", "lora.tfinal=40", "lora.delta_t=5"],
}


def run_variant(name: str, out: Path, steps: int, threads: int) -> dict:
    """One training run as a child process; its figures."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "qlora.cli", "train", str(RECIPE), *VARIANTS[name], f"output.dir={run_dir}",
           f"train.max_steps={steps}", f"train.threads={threads}", "train.save_every=0", "--overwrite",
           "--samples", "0"]
    load_avg = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: qlora train failed; see {out / (name + '.log')}")
    text = (out / f"{name}.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    steps_s = [r["step_time_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "step_time_s" in r]
    return {"variant": name, "overrides": " ".join(VARIANTS[name]) or "(the recipe)",
            "eval_before": summary["eval_before"]["eval_loss"], "eval_after": summary["eval_after"]["eval_loss"],
            "load_s": float(re.search(r"loaded in ([0-9.]+)s", text).group(1)),
            "step_s": statistics.median(steps_s), "peak_rss_mb": usage.ru_maxrss / 1024,
            "wall_s": time.perf_counter() - start, "load_average": load_avg}


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["variant"] == "qlora"), None)
    lora16 = next((r for r in rows if r["variant"] == "lora-16bit"), None)
    lines = ["| variant | held-out loss step 0 -> end | vs 16-bit LoRA | load s (vs QLoRA) | step s (vs QLoRA) "
             "| peak RSS MB (vs QLoRA) | load avg | overrides |", "|" + "---|" * 8]
    for r in rows:
        gap = f"{100 * (r['eval_after'] / lora16['eval_after'] - 1):+.1f}%" if lora16 else "-"

        def vs(key: str, fmt: str) -> str:
            return f"{r[key]:{fmt}}" + (f" ({r[key] - ref[key]:+{fmt}})" if ref and r is not ref else "")

        lines.append(f"| {r['variant']} | {r['eval_before']:.4f} -> {r['eval_after']:.4f} | {gap} | {vs('load_s', '.1f')} "
                     f"| {vs('step_s', '.2f')} | {vs('peak_rss_mb', '.0f')} | {r['load_average']:.1f} | `{r['overrides']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants, in this order")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "variants")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--only: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(run_variant(name, args.out, args.steps, args.threads))
        (args.out / "table.json").write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
