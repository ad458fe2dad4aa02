"""qlora plot: loss curves from metrics.jsonl, and clear errors for bad run folders."""

from __future__ import annotations

import json

import pytest

from qlora.reports import plot as P
from qlora.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def synthetic_run(run_dir) -> None:
    records = [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-4 * min(1, s / 3), "tokens": 512 * s,
                "step_time_s": 0.5, "tokens_per_s": 1024.0, "grad_norm": 1.0} for s in range(1, 11)]
    records.insert(5, {"step": 5, "eval_loss": 1.2, "eval_ppl": 3.32, "eval_tokens": 100})
    records.append({"step": 10, "eval_loss": 0.9, "eval_ppl": 2.46, "eval_tokens": 100})
    write_metrics(run_dir, records)


def test_plot_writes_a_png_into_the_run_folder(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert "loss.png" in capsys.readouterr().out


def test_plot_out_option(tmp_path):
    synthetic_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".curves.png.*"))  # no temporary left behind


def test_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.4},
                             {"step": 3, "loss": 1.3}, {"step": 2, "eval_loss": 1.6}])
    train, evals = P.load_run_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 2.0), (2, 1.4), (3, 1.3)]
    assert [r["eval_loss"] for r in evals] == [1.6]


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("no_metrics", "has no metrics.jsonl"),
    ("garbage", "not one JSON object per line"),
    ("no_loss", "no train ('loss') or eval"),
])
def test_bad_run_dir_exits_2_with_a_clear_message(tmp_path, capsys, case, message):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "garbage":
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    if case == "no_loss":
        write_metrics(run_dir, [{"step": 1, "grad_norm": 1.0}])
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run_dir / "loss.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    synthetic_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err


def test_loss_figure_texts_keep_clear_of_each_other(tmp_path):
    """The run title sits above the panel titles, and each y-label and tick label stays inside the
    figure and clear of the panel to its left (issue: the title overlapped the panel titles, LR tick
    labels were clipped, y-labels collided). Losses near 10.8 and a 2e-4 cosine give wide labels."""
    import math

    run = tmp_path / "a-run-folder-with-a-long-name"
    write_metrics(run, [{"step": s, "loss": 10.8 - 0.013 * s, "lr": 1e-4 * (1 + math.cos(math.pi * s / 12)),
                         "tokens": 190 * s} for s in range(1, 13)]
                  + [{"step": s, "eval_loss": 10.82 - 0.012 * s} for s in (0, 4, 8, 12)])
    fig = P.loss_figure(run)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    gap = 3  # pixels at 100 dpi
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert title.y0 >= ax.title.get_window_extent(renderer).y1 + gap
    labels = []
    for ax in fig.axes:
        parts = [ax.yaxis.label.get_window_extent(renderer), ax.yaxis.get_offset_text().get_window_extent(renderer)]
        parts += [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
        assert all(fig.bbox.x0 <= b.x0 and b.x1 <= fig.bbox.x1 and b.y1 <= fig.bbox.y1 for b in parts)
        labels.append(parts)
    for left_ax, right_labels in zip(fig.axes, labels[1:]):
        edge = left_ax.get_window_extent(renderer).x1
        assert min(b.x0 for b in right_labels) >= edge + gap
    P.pyplot().close(fig)
