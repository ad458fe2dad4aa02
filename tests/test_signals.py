"""SIGINT / SIGTERM during training: the step is finished and checkpointed, exit 130 / 143, and a
second signal during the save stops at once with the previous checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qlora.errors import Interrupted
from qlora.io import atomic_folder
from qlora.runtime import Runtime
from qlora.training.checkpoint import verify
from qlora.training.signals import GracefulStop
from test_train import TINY, home, run_cli, tiny_run  # noqa: F401  (module fixtures)

ONE_PROCESS = Runtime(torch.device("cpu"), torch.float32)


def test_first_signal_waits_for_the_step_and_names_the_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    with GracefulStop() as stop:
        stop.arm(tmp_path)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at once, only sets the flag
        assert stop.pending(ONE_PROCESS) and stop.agreed
        with pytest.raises(Interrupted) as caught:
            stop.finish(3, tmp_path / "checkpoints" / "step-000003")
    assert caught.value.signum == signal.SIGTERM
    assert str(caught.value) == (f"interrupted by SIGTERM after step 3; checkpoint "
                                 f"{tmp_path / 'checkpoints' / 'step-000003'} written (continue with --resume)")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_no_signal_no_stop(tmp_path):
    with GracefulStop() as stop:
        stop.arm(tmp_path)
        assert not stop.pending(ONE_PROCESS)
        stop.finish(4, tmp_path / "checkpoints" / "step-000004")  # returns


def test_a_second_signal_during_the_save_stops_at_once_keeping_the_previous_checkpoint(tmp_path):
    previous = tmp_path / "checkpoints" / "step-000002"
    previous.mkdir(parents=True)
    (previous / "adapter_model.safetensors").write_bytes(b"old")
    with GracefulStop() as stop:
        stop.arm(tmp_path)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.pending(ONE_PROCESS)
        with pytest.raises(Interrupted) as caught:
            with atomic_folder(tmp_path / "checkpoints" / "step-000003") as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGINT)  # the second one raises here
                (tmp / "trainer_state.rank0.pt").write_bytes(b"never written")
    assert caught.value.signum == signal.SIGINT and "stopped at once" in str(caught.value)
    assert str(previous) in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]  # no temp folder
    assert (previous / "adapter_model.safetensors").read_bytes() == b"old"


def test_a_signal_before_the_loop_stops_at_once(tmp_path):
    with GracefulStop() as stop:  # not armed: loading, final evaluation and save
        with pytest.raises(Interrupted, match="interrupted by SIGINT: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def wait_for_step(metrics, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.05)


@pytest.mark.slow  # two runs of the tiny recipe (~40 s); tools/chaos.py runs this trial at random moments
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_resume_is_bit_identical(tiny_run, tmp_path, signum):  # noqa: F811
    reference, _ = tiny_run  # the same 4-step recipe, uninterrupted
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora.cli", "train", str(TINY), f"output.dir={out}",
                             "train.save_every=0", "--samples", "0"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qlora train: interrupted by {signal.Signals(signum).name} after step ")
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and str(saved[0]) in last and verify(saved[0]) is None  # save_every=0: only this one
    assert not (out / "run.lock").exists()
    resumed = run_cli("train", str(TINY), f"output.dir={out}", "train.save_every=0", "--samples", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter_model.safetensors").read_bytes()
