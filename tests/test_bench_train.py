"""Tests for `tools/bench_train.py`: the summary arithmetic, and one real 2-step run of both stacks on
the built-in `tiny-llama` (about 15 s on 2 cores: two subprocesses that import torch, transformers,
peft and bitsandbytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_train.py"
sys.path.insert(0, str(TOOL.parent))

import bench_train  # noqa: E402


def _result(step_seconds: list[float], tokens: list[int], imports: int, peak: int) -> dict:
    steps = [{"seconds": s, "tokens": t, "loss": 2.0 - i / 10} for i, (s, t) in enumerate(zip(step_seconds, tokens))]
    return {"load_s": 1.0, "steps": steps, "rss_anon_after_imports": imports, "peak_rss_anon_train": peak,
            "eval_before": {"eval_loss": 3.0}, "eval_after": {"eval_loss": 2.5}}


def test_summary_skips_the_first_step_and_subtracts_the_import_baseline():
    s = bench_train.summarise(_result([9.0, 1.0, 3.0, 2.0], [100, 200, 400, 300], 300 * 10**6, 800 * 10**6))
    assert s["median_step_s"] == 2.0  # of 1, 3, 2: the 9 s first step is not timed
    assert s["tokens_per_s"] == pytest.approx(900 / 6.0)
    assert s["peak_train_mb"] == pytest.approx(500.0)
    assert (s["first_loss"], s["last_loss"]) == (2.0, pytest.approx(1.7))


def test_report_ratios_are_peer_over_ours_for_time_and_ours_over_peer_for_memory():
    fast = bench_train.summarise(_result([5.0, 1.0], [100, 100], 0, 100 * 10**6))
    slow = bench_train.summarise(_result([5.0, 3.0], [100, 100], 0, 400 * 10**6))
    table = bench_train.report({"ours": fast, "peer": slow})
    assert "3.00 x faster" in table and "3.00 x (speed-up)" in table and "0.25 x the peer's memory" in table


def test_two_steps_on_tiny_llama(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(TOOL), "--model", "tiny-llama", "--steps", "2", "--eval-batches", "2",
                           "--max-wait", "0", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load average" in proc.stdout and "held-out loss after" in proc.stdout
    data = json.loads(out.read_text())
    ours, peer = data["results"]["ours"], data["results"]["peer"]
    assert ours["batches_sha256"] == peer["batches_sha256"]
    assert ours["trainable_params"] == peer["trainable_params"]  # same LoRA targets and rank
    # Same NF4 codes (ours is bit-exact with bitsandbytes) and LoRA B = 0: the untrained models agree;
    # they differ only by the peer's fp32 norms / lm_head (0.0001 of 10.82 seen here).
    before = ours["eval_before"]["eval_loss"], peer["eval_before"]["eval_loss"]
    assert before[0] == pytest.approx(before[1], rel=1e-3)
    assert ours["steps"][0]["loss"] == pytest.approx(peer["steps"][0]["loss"], rel=1e-3)
    for r in (ours, peer):
        assert r["eval_after"]["eval_loss"] < r["eval_before"]["eval_loss"]
        assert len(r["steps"]) == 2 and all(s["tokens"] > 0 and s["seconds"] > 0 for s in r["steps"])
        assert r["peak_rss_anon_train"] > r["rss_anon_after_imports"]
    assert set(data["summary"]) == {"ours", "peer"}
