"""The main job through the real CLI on the real embedded model (SmolLM2-135M-Instruct), few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2_135m_chat_cpu.yaml"

# Held-out loss of the 4-bit (NF4 + DQ, block 64) base model on the recipe's first 8 eval
# conversations, recorded with this code (torch 2.13 CPU). The quantiser is bit-exact with
# bitsandbytes and the data split deterministic, so only float summation order can move it.
PINNED_BASE_EVAL_LOSS = 2.3091669557321124


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("qlora-home")
    out = tmp_path_factory.mktemp("runs") / "main-job"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QLORA_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "qlora.cli", "train", str(RECIPE), f"output.dir={out}", "train.max_steps=3",
         "train.micro_batch_size=4", "train.eval_every=0", "train.save_every=0", "train.eval_steps=2",
         "optim.warmup_steps=0", "--samples", "1"],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, home


def test_main_job_trains_the_embedded_model(run, monkeypatch):
    from qlora.hf.embedded import builtin_folder

    out, result, home = run
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert before == pytest.approx(PINNED_BASE_EVAL_LOSS, rel=1e-3)
    assert after < before  # three steps at lr 5e-4 already fit the chat style
    assert "trainable params: 4,884,480" in result.stdout  # r=16 on all 7 projections x 30 layers
    sample = summary["samples"][0]
    assert sample["prompt"] and sample["before"] and sample["after"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # the built-in name is written as its built folder, so peft.AutoPeftModelForCausalLM finds it
    monkeypatch.setenv("QLORA_HOME", str(home))  # the run built it there: found, not rebuilt
    built = str(Path(builtin_folder("smollm2-135m")).resolve())
    assert config["r"] == 16 and config["base_model_name_or_path"] == built
