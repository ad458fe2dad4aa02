"""The training and evaluation display: smoothed loss, lr, epoch, ETA; plain lines off a terminal."""

from __future__ import annotations

import io
import math

import pytest

from qlora import display
from qlora.display import EvalProgress, TrainDisplay, ema


def test_ema_is_bias_corrected_and_skips_non_finite_values():
    assert ema([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])  # a constant stays itself
    # m1 = 0.1, m2 = 0.9 * 0.1 + 0.1 * 3 = 0.39; corrected 0.1 / 0.1 and 0.39 / 0.19
    assert ema([1.0, 3.0]) == pytest.approx([1.0, 0.39 / 0.19])
    smoothed = ema([1.0, math.nan, 3.0])
    assert smoothed[1] == pytest.approx(1.0) and smoothed[2] == pytest.approx(0.39 / 0.19)
    assert math.isnan(ema([math.nan])[0])


def record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 2.5e-4, "tokens_per_s": 456.7}


def test_off_a_terminal_each_logged_step_is_one_plain_line(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])  # start, then 3 steps of 1 s, 10 s (an eval), 1 s
    monkeypatch.setattr(display.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()  # not a TTY
    shown = TrainDisplay(total=10, initial=0, steps_per_epoch=4, log_every=2, stream=out)
    assert shown.bar is None
    losses = [0.0050, 0.0038, 3.1649, 0.0040]
    for step, loss in enumerate(losses, 1):
        shown.update(1)
        if step % 2 == 0:
            shown.log(record(step, loss))
    lines = out.getvalue().splitlines()
    smoothed = ema([losses[1], losses[3]])  # the logged steps
    assert lines == [
        f"step 2/10: loss {smoothed[0]:.4f} (this step 0.0038), lr 2.50e-04, epoch 0.50, 457 tokens/s, ETA 8s",
        f"step 4/10: loss {smoothed[1]:.4f} (this step 0.0040), lr 2.50e-04, epoch 1.00, 457 tokens/s, ETA 6s",
    ]  # ETA: the median step time (1 s; the 10 s step is an outlier) x the steps left


def test_a_skipped_step_says_so():
    out = io.StringIO()
    shown = TrainDisplay(total=3, initial=1, steps_per_epoch=3, log_every=1, stream=out)
    shown.update(1)
    shown.log({**record(2, math.nan), "skipped": True})
    assert out.getvalue().startswith("step 2/3: loss nan (this step nan)")
    assert out.getvalue().rstrip().endswith("(skipped: non-finite gradients)")


def test_a_terminal_gets_a_bar_with_the_same_fields(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = Terminal()
    shown = TrainDisplay(total=4, initial=0, steps_per_epoch=4, log_every=1, stream=out)
    shown.update(1)
    shown.log(record(1, 2.0))
    shown.bar.refresh()
    shown.close()
    text = out.getvalue()
    assert "1/4" in text and "loss=2.0000" in text and "lr=2.50e-04" in text and "epoch=0.25" in text
    assert "eta=" in text and "tok/s=457" in text


def test_disabled_prints_nothing():
    out = io.StringIO()
    shown = TrainDisplay(total=4, initial=0, steps_per_epoch=4, log_every=1, enabled=False, stream=out)
    shown.update(1)
    shown.log(record(1, 2.0))
    assert out.getvalue() == ""


def test_eval_progress_prints_a_line_at_each_tenth():
    out = io.StringIO()
    progress = EvalProgress(20, "eval", stream=out)
    for done in range(1, 21):
        progress(done, 10 * done)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("eval: 2/20 batches, 20 tokens, ")
    assert lines[-1].startswith("eval: 20/20 batches, 200 tokens, ")


def test_plot_draws_the_smoothed_loss_over_the_raw_one(tmp_path):
    from test_plot import synthetic_run

    from qlora.reports.plot import loss_figure

    synthetic_run(tmp_path / "run")
    fig = loss_figure(tmp_path / "run")
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    raw = [3.0 / s for s in range(1, 11)]
    assert lines["train (per step)"] == pytest.approx(raw)
    assert lines["train (smoothed, EMA 0.9)"] == pytest.approx(ema(raw))
