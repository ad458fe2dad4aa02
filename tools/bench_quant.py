#!/usr/bin/env python
"""Benchmark qlora's 4-bit CPU kernels against bitsandbytes, in one run.

    python tools/bench_quant.py [--repeat 20]

Prints one table: NF4 + double-quant weights (4096x4096 and 11008x4096) dequantised to bf16 by
`qlora.quant.dequantize_4bit(packed, state, out=buf)` vs `bitsandbytes.functional.dequantize_4bit`,
and as a fraction of the bandwidth of a bf16 `out.copy_(src)` of the same size; the 1-row matvec
`qlora.quant.matmul_4bit` vs `bitsandbytes.matmul_4bit`; and `qlora.quant.quantize_4bit` vs
bitsandbytes' quantize. Rows marked "native" time the kernels in `qlora.quant.native` alone (no
scale decoding, no validation), so the public API's overhead is visible.

Timings on a shared machine are only meaningful as ratios measured under the same load: the tool
first waits until other processes leave the CPUs idle (from /proc/stat), then runs the contenders
of each comparison round-robin, one call each per round, and reports the median per contender.
Targets (issue "Core"): dequantise >= 2x bnb and >= 50% of copy bandwidth; matvec >= 5x bnb;
quantise >= 1x bnb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

SHAPES = ((4096, 4096), (11008, 4096))


@dataclass
class Row:
    """One line of the table: `ours` vs `peer` (ms); `target` is the ratio peer / ours to reach."""

    op: str
    shape: str
    ours: float
    peer: float
    peer_name: str
    target: float

    @property
    def ratio(self) -> float:
        return self.peer / self.ours


# ------------------------------------------------------------------------------ machine quiet


def _cpu_busy_fraction(seconds: float) -> float | None:
    """Busy fraction of all CPUs over `seconds` (this process sleeps meanwhile), from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_quiet(max_busy: float, max_wait: float) -> str:
    """Waits (up to `max_wait` s) until other load is below `max_busy` of the CPUs; says how it went."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = _cpu_busy_fraction(1.0)
        if busy is None:
            load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0.0
            return f"no /proc/stat; 1-min load per CPU {load:.2f}"
        if busy <= max_busy:
            return f"quiet: other load {busy:.0%} of the CPUs"
        if time.monotonic() > deadline:
            print(f"WARNING: machine still busy ({busy:.0%} of the CPUs used by others) after "
                  f"{max_wait:.0f} s; timings are noisy (multi-threaded kernels wait for descheduled "
                  f"threads; --threads 1 is steadier on a shared machine)",
                  file=sys.stderr)
            return f"BUSY: other load {busy:.0%} of the CPUs"
        print(f"waiting for a quiet machine (other load {busy:.0%})...", file=sys.stderr)


# ---------------------------------------------------------------------------------- timing


def race(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median milliseconds per contender, calling them round-robin after one warm-up call each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------- benchmarks


def bench_shape(n_out: int, n_in: int, repeat: int) -> list[Row]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    import qlora.quant as q
    from qlora.quant import native

    shape = f"{n_out}x{n_in}"
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, dtype=torch.bfloat16) * 0.02
    packed, state = q.quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True)
    bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if not torch.equal(packed.view(-1), bnb_packed.view(-1)):
        raise SystemExit(f"{shape}: our packed weight differs from bitsandbytes'; fix that first")
    buf = torch.empty(n_out, n_in, dtype=torch.bfloat16)
    src = torch.randn(n_out, n_in).to(torch.bfloat16)
    x = torch.randn(1, n_in, dtype=torch.bfloat16)
    flat, scales, code = packed.view(-1), q.block_scales(state), state.code.float()

    deq = {"ours": lambda: q.dequantize_4bit(packed, state, out=buf),
           "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state),
           "copy_": lambda: buf.copy_(src)}
    mv = {"ours": lambda: q.matmul_4bit(x, packed, state),
          "bnb": lambda: bnb.matmul_4bit(x, bnb_packed.t(), bnb_state)}
    quant = {"ours": lambda: q.quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True),
             "bnb": lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)}
    if native.available():
        bounds, order = q.codebooks.sorted_bounds("nf4")
        absmax_out = torch.empty(scales.numel())
        deq["native"] = lambda: native.dequantize_4bit(flat, scales, code, 64, buf)
        mv["native"] = lambda: native.gemv_4bit(x, flat, scales, code, 64, n_out, n_in)
        quant["native"] = lambda: native.quantize_4bit(w.view(-1), 64, bounds, order,
                                                       torch.empty_like(flat), absmax_out)

    t_deq, t_mv = race(deq, repeat), race(mv, repeat)
    t_q = race(quant, max(3, repeat // 4))  # bnb's quantise is pure PyTorch and slow
    if not torch.equal(q.dequantize_4bit(packed, state, out=buf), bnbf.dequantize_4bit(bnb_packed, bnb_state)):
        raise SystemExit(f"{shape}: our dequantised weight differs from bitsandbytes'")

    rows = []
    for who in ("ours", "native"):
        if who not in t_deq:
            continue
        tag = "" if who == "ours" else " (native)"
        rows += [Row(f"dequantise{tag}", shape, t_deq[who], t_deq["bnb"], "bnb", 2.0),
                 Row(f"dequantise vs copy_{tag}", shape, t_deq[who], t_deq["copy_"], "copy_", 0.5),
                 Row(f"matvec 1 row{tag}", shape, t_mv[who], t_mv["bnb"], "bnb", 5.0),
                 Row(f"quantise{tag}", shape, t_q[who], t_q["bnb"], "bnb", 1.0)]
    return rows


def print_table(rows: list[Row]) -> bool:
    header = f"{'operation':34} {'shape':>11} {'ours ms':>9} {'peer ms':>9} {'peer':>6} {'peer/ours':>9} {'target':>7}  ok"
    print(header)
    print("-" * len(header))
    all_ok = True
    for r in sorted(rows, key=lambda r: (r.op.replace(" (native)", ""), "native" in r.op, r.shape)):
        ok = r.ratio >= r.target
        all_ok &= ok
        print(f"{r.op:34} {r.shape:>11} {r.ours:9.2f} {r.peer:9.2f} {r.peer_name:>6} {r.ratio:9.2f} "
              f"{r.target:6.1f}x  {'yes' if ok else 'NO'}")
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per contender (median reported)")
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="largest CPU fraction other processes may use before timing starts")
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / kernel threads (default: torch's default, one per core)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")

    import torch

    from qlora.quant import native

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    quiet = wait_until_quiet(args.max_busy, args.max_wait)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernels "
          f"{'on' if native.available() else 'OFF (reference path)'}; {quiet}; median of {args.repeat}")
    rows = [row for n_out, n_in in SHAPES for row in bench_shape(n_out, n_in, args.repeat)]
    all_ok = print_table(rows)
    print("peer/ours: speed-up over the peer (for copy_: fraction of copy bandwidth reached)")
    return 0 if all_ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
