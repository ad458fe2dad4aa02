"""Two-process data parallel training on CPU (gloo) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny_smoke.yaml")
# No dropout, so both layouts draw no random masks and must agree to float rounding.
COMMON = ["lora.dropout=0.0", "train.save_every=0", "train.eval_every=0", "--samples", "0"]


def _env(home: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QLORA_HOME": str(home),
            "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _one_and_two_processes(tmp_path: Path, port: int, *extra: str) -> tuple[Path, Path]:
    """The tiny recipe as 1 process x 2 accumulated micro-batches and as 2 processes x 1."""
    home = tmp_path / "home"
    single, double = tmp_path / "single", tmp_path / "double"
    one = subprocess.run([sys.executable, "-m", "qlora.cli", "train", TINY, f"output.dir={single}",
                          "train.micro_batch_size=2", "train.grad_accum_steps=2", *COMMON, *extra],
                         capture_output=True, text=True, env=_env(home), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), "-m", "qlora.cli", "train", TINY, f"output.dir={double}",
                          "train.micro_batch_size=2", "train.grad_accum_steps=1", *COMMON, *extra],
                         capture_output=True, text=True, env=_env(home), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return single, double


def _assert_same_run(single: Path, double: Path, rel: float) -> None:
    summary = json.loads((double / "summary.json").read_text())
    assert summary["ranks_agree"] is True  # rank 1's adapter equals rank 0's (checked in-process)
    assert _losses(double) == pytest.approx(_losses(single), rel=rel)
    single_eval = json.loads((single / "summary.json").read_text())["eval_after"]["eval_loss"]
    assert summary["eval_after"]["eval_loss"] == pytest.approx(single_eval, rel=rel)


def test_torchrun_two_processes_match_one(tmp_path):
    _assert_same_run(*_one_and_two_processes(tmp_path, 29517), rel=1e-4)


def test_fsdp_two_processes_match_one(tmp_path):
    """FSDP shards the packed 4-bit weights (stored as bf16) and the adapters over 2 CPU processes."""
    single, double = _one_and_two_processes(tmp_path, 29518, "train.distributed=fsdp",
                                            "quant.quant_storage=bf16", "optim.name=adamw")
    # FSDP reduce-scatters bf16 gradients where one process sums them locally: a few bf16 ulps.
    _assert_same_run(single, double, rel=1e-3)


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_runs_two_processes_on_cpu(tmp_path):
    """`accelerate launch --multi_gpu` works on CPU with gloo (`--cpu` would start ONE process)."""
    pytest.importorskip("accelerate")
    out = tmp_path / "accel"
    env = {**_env(tmp_path / "home"), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", "29519", "-m", "qlora.cli", "train", TINY,
                             f"output.dir={out}", *COMMON],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_agree"] is True
