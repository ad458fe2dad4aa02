"""The driver: preflight, then every selected section, one table on stdout and one JSON file."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gpucheck.common import Context, Row, row
from gpucheck.preflight import preflight
from gpucheck.sections import SECTIONS, missing_needs

MARKS = {True: "ok", False: "FAIL", None: ""}


def print_preflight(found: dict) -> None:
    for name, check in found.items():
        mark = {True: "ok", False: "MISSING", None: "-"}[check.ok]
        print(f"pre    {name:<14} {mark:>7}  {check.detail}" + (f"  -> {check.fix}" if check.fix else ""), flush=True)


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
        print(f"{r['section']:<6} {r['name']:<58} {MARKS[r['ok']]:>4} {value:>16}  {r['detail']}", flush=True)


def run_section(section, ctx: Context) -> list[Row]:
    missing = missing_needs(section, ctx)
    if missing:
        return [row(section.name, "skipped", None, detail="; ".join(f"{m}: {ctx.found[m].detail}" for m in missing))]
    try:
        return section.run(ctx)
    except Exception as err:  # one broken section must not cost the others' figures
        return [row(section.name, "section failed", False, detail=f"{type(err).__name__}: {err}")]


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in SECTIONS]
    p = argparse.ArgumentParser(description="the prepared GPU check (tools/gpu_check.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes (the default without CUDA)")
    p.add_argument("--repeat", type=int, default=20, help="back-to-back calls per timing")
    p.add_argument("--sections", default=",".join(names), help=f"comma-separated subset of {names}")
    p.add_argument("--json", default="gpu_check.json", help="where to write every figure")
    args = p.parse_args(argv)
    chosen = args.sections.split(",")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {names}")
    device = torch.device(args.device)
    smoke = args.smoke or device.type != "cuda"
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import qlora

    print(f"device: {label}; torch {torch.__version__}; qlora from {Path(qlora.__file__).parent.parent}; "
          f"{'smoke sizes' if smoke else 'full sizes'}", flush=True)
    found = preflight(device)
    print_preflight(found)
    ctx = Context(device, smoke, 3 if smoke else args.repeat, tempfile.mkdtemp(prefix="gpu-check-"), found)
    rows: list[Row] = []
    for section in (s for s in SECTIONS if s.name in chosen):
        t0 = time.perf_counter()
        new = run_section(section, ctx)
        print_rows(new)
        print(f"{section.name}: {time.perf_counter() - t0:.1f} s", flush=True)
        rows += new
    with open(args.json, "w") as f:
        json.dump({"device": label, "torch": torch.__version__, "smoke": smoke, "rows": rows,
                   "preflight": {k: vars(v) for k, v in found.items()}}, f, indent=2)
    return 1 if any(r["ok"] is False for r in rows) else 0
