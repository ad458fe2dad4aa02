"""`qlora eval RUN` / `generate RUN` on a run with no final adapter (still training, or killed after
a checkpoint) use the newest verified checkpoint's adapter and say so, or exit 2 when the run has
no adapter at all; they never evaluate the bare base without a word."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from test_lock import live_pid  # noqa: F401  (a fixture)
from test_train import home, run_cli, tiny_run  # noqa: F401  (fixtures)


@pytest.fixture
def killed(tiny_run, tmp_path):
    """The tiny run as if killed after its step-4 checkpoint: no adapter/, no summary."""
    out, _ = tiny_run
    copy = tmp_path / "killed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "adapter")
    (copy / "summary.json").unlink()
    return copy


@pytest.mark.slow  # two evals of the tiny run through the CLI
def test_eval_of_a_killed_run_uses_its_newest_checkpoint(killed, tiny_run, tmp_path):
    result = run_cli("eval", str(killed), "--json", str(tmp_path / "run.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped before writing its final adapter" in result.stderr and "step-000004" in result.stderr
    direct = run_cli("eval", str(killed), "--adapter", str(killed / "checkpoints" / "step-000004" / "adapter"),
                     "--json", str(tmp_path / "direct.json"))
    assert direct.returncode == 0, direct.stderr[-3000:]
    loss = json.loads((tmp_path / "run.json").read_text())["eval_loss"]
    assert loss == json.loads((tmp_path / "direct.json").read_text())["eval_loss"]
    summary = json.loads((tiny_run[0] / "summary.json").read_text())
    assert loss != pytest.approx(summary["eval_before"]["eval_loss"], rel=1e-6)  # not the bare base


def test_a_run_with_no_adapter_yet_exits_2(killed, live_pid):  # noqa: F811
    shutil.rmtree(killed / "checkpoints")
    for command in (["eval", str(killed)], ["generate", str(killed), "--prompt", "hi"]):
        result = run_cli(*command)
        assert result.returncode == 2 and "stopped before writing its final adapter" in result.stderr, result.stderr
        assert "has no complete checkpoint yet" in result.stderr and "--base" in result.stderr
    lock = {"pid": live_pid, "host": os.uname().nodename, "started": time.time() - 1}
    (killed / "run.lock").write_text(json.dumps(lock))
    result = run_cli("eval", str(killed))
    assert result.returncode == 2 and "is still training" in result.stderr, result.stderr


def test_a_resume_at_the_final_step_logs_its_last_eval_once(killed):
    """Killed after the final checkpoint and eval but before the adapter: the resume trains nothing,
    keeps the one eval record of the last step, and reports the run's logged throughput."""
    from qlora.run_dir import read_metrics

    evals_before = [r for r in read_metrics(killed) if "eval_loss" in r]
    result = run_cli("train", str(killed / "recipe.yaml"), f"output.dir={killed}", "--resume", "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(killed) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [r["step"] for r in evals_before] == [0, 2, 4]
    assert " at 0 tokens/s" not in result.stdout and "tokens/s" in result.stdout
    assert (killed / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_without_a_checkpoint_names_overwrite(tmp_path):
    """A run killed before its first checkpoint: --resume says that --overwrite starts it afresh."""
    from test_train import TINY

    run = tmp_path / "killed-early"
    run.mkdir()
    (run / "recipe.yaml").write_text(TINY.read_text())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 10.8}\n')
    result = run_cli("train", str(TINY), f"output.dir={run}", "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "has no complete checkpoint to resume from" in line and "--overwrite" in line and "afresh" in line
