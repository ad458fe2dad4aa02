"""Keeping runs: evaluations printed, trackers, the best adapter, early stopping, exact resume of both.

The tiny recipe through the real CLI with a high constant learning rate (optim.lr=0.3), which
makes the held-out loss go down and up again. Its evaluations (every 2 steps), first recorded with
this code on torch 2.13 CPU / bitsandbytes 0.50.2:

    step      0       2       4       6       8       10      12
    loss   10.8242 10.7294 10.8098 10.6542 10.6423 10.6306 10.6370

so the best is step 10, not the last step 12; and with early_stopping_threshold 0.05 only steps 2
and 6 count as progress, so patience 2 stops the run at step 10 (steps 8 and 10 improve by less
than 0.05). Each decision has a margin of >= 0.03 nats, far above other CPUs' float noise.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from qlora.run_dir import read_metrics
from test_train import TINY, home, run_cli  # noqa: F401  (home: a module fixture)

RISING = ["optim.lr=0.3", "optim.scheduler=constant", "train.eval_every=2", "train.save_every=2",
          "train.keep_best=eval_loss", "--samples", "0"]
STOPPING = RISING + ["train.early_stopping_patience=2", "train.early_stopping_threshold=0.05"]


def train(out, *overrides: str, env: dict | None = None):
    result = run_cli("train", str(TINY), f"output.dir={out}", *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def best_run(home, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "best"
    result = train(out, *RISING, "train.max_steps=12", "train.keep_checkpoints=3", "train.eval_samples=1",
                   "train.eval_sample_tokens=4", "output.report_to=[tensorboard, wandb]",
                   env={"WANDB_MODE": "offline"})
    return out, result


@pytest.fixture(scope="module")
def stopped_run(home, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "stopped"
    return out, train(out, *STOPPING, "train.max_steps=40")


def weights(folder):
    return (folder / "adapter_model.safetensors").read_bytes()


def test_each_evaluation_is_printed_and_logged_with_samples(best_run):
    out, result = best_run
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8, 10, 12]
    for r in evals:
        assert f"eval step {r['step']}" in result.stdout and f"loss {r['eval_loss']:.4f}" in result.stdout
        assert len(r["samples"]) == 1 and r["samples"][0]["prompt"] and "answer" in r["samples"][0]
    assert "eval step 0 (before training)" in result.stdout


def test_keep_best_makes_the_adapter_the_best_evaluation(best_run):
    out, result = best_run
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert best_step == 10 and evals[12] > evals[10]  # the premise (see the module docstring)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 10
    assert weights(out / "adapter") == weights(out / "best")
    assert weights(out / "adapter") != weights(out / "checkpoints" / "step-000012" / "adapter")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["step"] == 10 and summary["eval_after"]["eval_loss"] == pytest.approx(evals[10])
    assert "adapter (best eval, step 10)" in result.stdout


def test_keep_checkpoints_sets_the_rotation(best_run):
    out, _ = best_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008", "step-000010", "step-000012"]


def test_tensorboard_events_hold_the_metrics(best_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = best_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "eval_loss", "eval_ppl"} <= set(events.Tags()["scalars"])
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    logged = [(e.step, e.value) for e in events.Scalars("eval_loss")]
    assert logged == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]


def test_wandb_offline_run_is_written_in_the_run_folder(best_run):
    out, _ = best_run
    (run,) = list((out / "wandb").glob("offline-run-*"))
    (log,) = list(run.glob("run-*.wandb"))  # wandb's protobuf record log, for `wandb sync`
    data = log.read_bytes()
    assert all(key.encode() in data for key in ("eval_loss", "eval_ppl", "grad_norm", "tokens_per_s"))
    assert b"keep_best" in data  # the recipe went in as the run's config


@pytest.mark.slow  # ~20 s; test_early_stopping_resumes_with_its_patience resumes the same state by default
def test_keep_best_resumes_exactly(best_run, tmp_path):
    """Killed after step 10's checkpoint: the resumed run must still know step 10 is the best."""
    out, _ = best_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000012")
    shutil.rmtree(copy / "adapter")
    train(copy, *RISING, "train.max_steps=12", "train.keep_checkpoints=3", "--resume")
    assert weights(copy / "adapter") == weights(out / "adapter") == weights(copy / "best")


def test_early_stopping_stops_after_patience_evaluations(stopped_run):
    out, result = stopped_run
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [0, 2, 4, 6, 8, 10]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early_at"] == 10 and summary["best"]["step"] == 10
    assert "early stopping at step 10" in result.stdout and "10 of 40 steps" in result.stdout


def test_early_stopping_resumes_with_its_patience(stopped_run, tmp_path):
    """Resumed from step 6, the run must count step 8's small gain as no progress again and stop
    at 10; a fresh patience count would run on to step 12."""
    out, _ = stopped_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000008")
    shutil.rmtree(copy / "adapter")
    result = train(copy, *STOPPING, "train.max_steps=40", "--resume")
    assert "step-000006" in result.stdout and "early stopping at step 10" in result.stdout
    assert weights(copy / "adapter") == weights(out / "adapter")
    assert (copy / "best" / "best.json").read_text() == (out / "best" / "best.json").read_text()


def test_a_missing_tracker_is_one_warning(tmp_path, monkeypatch, caplog):
    import builtins

    from qlora.training.trackers import open_trackers

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.split(".")[0] == "mlflow":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with caplog.at_level(logging.WARNING, logger="qlora"):
        assert open_trackers(["mlflow"], tmp_path, {}) == []
    (message,) = [r.getMessage() for r in caplog.records]
    assert "output.report_to: mlflow" in message and "pip install -e '.[trackers]'" in message


def test_mlflow_gets_the_metrics(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from qlora.training.metrics import MetricsLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = MetricsLogger(tmp_path, ["mlflow"], {"lora": {"r": 8}})
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": True})
    logger.log({"step": 2, "eval_loss": float("nan"), "samples": [{"prompt": "a", "answer": "b"}]})
    logger.close()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params == {"lora.r": "8"} and run.data.metrics == {"loss": 2.5, "lr": 1e-3}


def test_best_tracker_rules():
    from qlora.training.evals import BestTracker

    t = BestTracker(threshold=0.1)
    steps = [(0, 3.0), (1, 2.95), (2, 2.8), (3, float("nan")), (4, 2.85)]
    news = [t.update(step, {"step": step, "eval_loss": loss}) for step, loss in steps]
    assert news == [True, True, True, False, False]  # any drop is a new best
    assert (t.best_step, t.bad_evals) == (2, 2)  # 2.8 was progress (< 2.95 - 0.1); NaN and 2.85 were not
    again = BestTracker()
    again.load_state_dict(t.state_dict())
    assert again == t


def test_the_older_tensorboard_key_still_reports_to_tensorboard():
    from qlora.config import OutputConfig
    from qlora.training.trackers import tracker_names

    assert tracker_names(OutputConfig(tensorboard=True)) == ["tensorboard"]
    assert tracker_names(OutputConfig(report_to=["wandb", "tensorboard"], tensorboard=True)) == ["wandb", "tensorboard"]
    assert tracker_names(OutputConfig()) == []
