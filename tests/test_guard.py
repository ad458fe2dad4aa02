"""The finiteness guard through the real CLI: a NaN step is skipped, a streak stops the run with
exit status 3, no non-finite checkpoint is written and metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora.errors import NonFiniteError
from qlora.training.guard import INJECT_ENV, StepGuard, weights_finite
from qlora.training.checkpoint import verify
from test_train import TINY, home, run_cli  # noqa: F401  (home is a fixture)


def strict_records(run_dir) -> list[dict]:
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def test_guard_counts_streaks_and_stops():
    guard = StepGuard(max_bad_steps=2)
    assert guard.step_ok(1.0, 1) and not guard.step_ok(float("nan"), 2)
    assert guard.step_ok(torch.tensor(0.5), 3)  # a good step ends the streak
    assert not guard.step_ok(float("inf"), 4)
    with pytest.raises(NonFiniteError, match="max_bad_steps=2"):
        guard.step_ok(float("nan"), 5)
    assert guard.bad_total == 3


def test_guard_warns_about_dead_training(caplog):
    guard = StepGuard(max_bad_steps=3)
    for step in range(1, 5):
        assert guard.step_ok(0.0, step)
    assert sum("exactly 0" in r.message for r in caplog.records) == 1  # once


def test_weights_finite_and_checkpoint_refusal():
    layer = torch.nn.Linear(2, 2)
    assert weights_finite(layer)
    guard = StepGuard(3)
    assert guard.can_checkpoint(layer, 1)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite at step 2"):
        guard.can_checkpoint(layer, 2)
    guard.step_ok(float("nan"), 3)
    assert not guard.can_checkpoint(torch.nn.Linear(2, 2), 3)  # never inside a streak
    guard.check_final(torch.nn.Linear(2, 2), 3)  # the final adapter: finite weights suffice (a warning)


def test_one_nan_step_is_skipped_and_the_run_ends_well(home, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "3")
    out = tmp_path / "run"
    result = run_cli("train", str(TINY), f"output.dir={out}", "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in strict_records(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[2]["skipped"] is True and train[2]["grad_norm"] is None
    assert all(math.isfinite(r["grad_norm"]) and "skipped" not in r for r in train[:2] + train[3:])
    assert "step 3: gradient norm is nan" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_streak_of_nan_steps_exits_3_and_keeps_the_last_finite_checkpoint(home, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "3,4")
    out = tmp_path / "run"
    result = run_cli("train", str(TINY), f"output.dir={out}", "train.max_bad_steps=2", "--samples", "0")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "stopped:" in result.stderr and "max_bad_steps=2" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert verify(out / "checkpoints" / "step-000002") is None
    assert not (out / "adapter").exists()
    assert not (out / "run.lock").exists()  # released on the way out
    strict_records(out)
