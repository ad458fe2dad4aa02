"""The training loop end to end: the tiny recipe through the real CLI, resume, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.recipe import load_recipe
from qlora.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_smoke.yaml"

# Losses of recipes/tiny_smoke.yaml (tiny random Llama, 4 steps), first recorded with this code
# on torch 2.13 CPU / bitsandbytes 0.50.2. Deterministic on one machine; the tolerance allows for
# other CPUs' float reduction order. The loss barely moves: the model is random, the run short.
PINNED_LOSSES = [10.799375, 10.815419801523987, 10.783533223470052, 10.762884252211627]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora-home")
    old = os.environ.get("QLORA_HOME")
    os.environ["QLORA_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("QLORA_HOME")
    else:
        os.environ["QLORA_HOME"] = old


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, input=stdin)


@pytest.fixture(scope="module")
def tiny_run(home, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("train", str(TINY), f"output.dir={out}", "--samples", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_tiny_recipe_through_the_cli(tiny_run):
    out, result = tiny_run
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"step", "loss", "lr", "tokens", "step_time_s", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in evals] == [0, 2, 4]  # before, every 2 steps, after
    assert train[-1]["tokens"] > train[0]["tokens"] > 0
    assert [r["loss"] for r in train] == pytest.approx(PINNED_LOSSES, rel=2e-3)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000  # matplotlib is in the test extra
    assert load_recipe(out / "recipe.yaml").train.max_steps == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert "eval loss:" in result.stdout and "before:" in result.stdout


def test_resume_continues_exactly(tiny_run, home, tmp_path):
    """Stop after step 2 (drop the later checkpoint), resume: steps 3-4 and the adapter match."""
    import shutil

    from safetensors.torch import load_file

    out, _ = tiny_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    shutil.rmtree(copy / "adapter")
    result = run_cli("train", str(TINY), f"output.dir={copy}", "--resume", "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    full = [r for r in read_metrics(out) if "loss" in r]
    resumed = [r for r in read_metrics(copy) if "loss" in r][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(copy / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_refuses_to_overwrite_an_existing_run(tiny_run):
    out, _ = tiny_run
    before = sorted(p.name for p in out.iterdir())
    result = run_cli("train", str(TINY), f"output.dir={out}")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("override, words", [
    ("lora.rr=4", ["lora.rr"]),
    ("train.max_steps=many", ["train.max_steps", "many"]),
    ("optim.name=sgd", ["optim.name", "sgd"]),
])
def test_bad_overrides_exit_2_and_write_nothing(tmp_path, override, words):
    out = tmp_path / "never"
    result = run_cli("train", str(TINY), f"output.dir={out}", override)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert all(w in result.stderr for w in words)
    assert not out.exists()


def test_missing_recipe_exits_2(tmp_path):
    result = run_cli("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_eval_command_reproduces_the_runs_final_eval(tiny_run, tmp_path):
    out, _ = tiny_run
    result = run_cli("eval", str(out), "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert measured["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-6)
    base = run_cli("eval", str(out), "--base", "--json", str(tmp_path / "base.json"))
    assert base.returncode == 0, base.stderr[-3000:]
    assert json.loads((tmp_path / "base.json").read_text())["eval_loss"] == pytest.approx(
        summary["eval_before"]["eval_loss"], rel=1e-6)


def test_generate_command_prompt_and_chat(tiny_run):
    out, _ = tiny_run
    def generate(*args: str, stdin: str | None = None) -> list[str]:
        result = run_cli("generate", str(out), "--max-new-tokens", "6", *args, stdin=stdin)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split("\n")[:-1]  # one line per answer (an answer may be empty)

    # The tiny random model answers a chat-templated prompt with special tokens only (empty text),
    # so the answers are compared as plain completions (--no-chat), where it writes words.
    (hello,), (hi,) = generate("--no-chat", "--prompt", "Hello"), generate("--no-chat", "--prompt", "Hi")
    assert hello.strip() and hi.strip() and hello != hi
    assert generate("--no-chat", stdin="Hello\nHi\n\n") == [hello, hi]  # standard input: one answer a line
    # Chat mode: a line per turn, none for /reset, an empty line ends the session.
    assert len(generate(stdin="Hello\n/reset\nHello\nHi\n\nnever read\n")) == 3
    bad = run_cli("generate", str(out), "--prompt", "Hello", "--max-new-tokens", "0")
    assert bad.returncode == 2 and "--max-new-tokens" in bad.stderr


def test_several_adapters_in_one_load(tiny_run, tmp_path):
    """eval scores each --adapter on one load; generate switches with /adapter. The second adapter
    is the run's adapter cat-combined with its negative: an update of zero, so it scores the base."""
    out, _ = tiny_run
    zero = tmp_path / "zero"
    combined = run_cli("combine", str(zero), "--adapter", f"{out / 'adapter'}:0.5",
                       "--adapter", f"{out / 'adapter'}:-0.5", "--method", "cat")
    assert combined.returncode == 0, combined.stderr[-3000:]
    result = run_cli("eval", str(out), "--adapter", str(out / "adapter"), "--adapter", f"zero={zero}",
                     "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    trained, cancelled = json.loads((tmp_path / "eval.json").read_text())["results"]
    summary = json.loads((out / "summary.json").read_text())
    assert trained["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-6)
    assert cancelled["eval_loss"] == pytest.approx(summary["eval_before"]["eval_loss"], rel=1e-4)
    base = run_cli("generate", str(out), "--base", "--no-chat", "--max-new-tokens", "6", "--prompt", "Hello")
    chat = run_cli("generate", str(out), "--adapter", f"zero={zero}", "--adapter", f"run={out / 'adapter'}",
                   "--use", "run", "--no-chat", "--max-new-tokens", "6",
                   stdin="Hello\n/adapter none\nHello\n/adapter nope\n/adapter zero\nHello\n\n")
    assert chat.returncode == 0, chat.stderr[-3000:]
    answers = chat.stdout.split("\n")[:-1]
    assert len(answers) == 3 and answers[1] == answers[2] == base.stdout.strip()
    assert "no adapter named 'nope'; loaded: run, zero" in chat.stderr


def test_overwrite_replaces_the_old_run_and_spares_foreign_folders(home, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    result = run_cli("train", str(TINY), f"output.dir={foreign}", "--overwrite")
    assert result.returncode == 2 and "refusing to delete" in result.stderr
    assert (foreign / "cat.jpg").exists()

    run = tmp_path / "run"
    for _ in range(2):
        result = run_cli("train", str(TINY), f"output.dir={run}", "--overwrite", "train.max_steps=1",
                         "train.save_every=0", "--samples", "0")
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1]  # not appended to the old run


def test_resume_puts_paged_optimiser_state_back_into_paged_buffers():
    """A paged optimiser's state1/state2 are copied into `get_state_buffer` buffers on resume (the
    CUDA path; here a stand-in optimiser and parameter record it, since paging needs CUDA)."""
    from types import SimpleNamespace

    import torch

    from qlora.training.checkpoint import _state_buffer

    made = []
    optimizer = SimpleNamespace(is_paged=True, get_state_buffer=lambda p, dtype: made.append(
        torch.zeros(p.shape, dtype=dtype)) or made[-1])
    param = SimpleNamespace(device=torch.device("cuda"), shape=torch.Size([4, 3]))
    saved = torch.arange(12, dtype=torch.uint8).reshape(4, 3)
    out = _state_buffer(optimizer, param, "state1", saved)
    assert out is made[0] and torch.equal(out, saved)
    on_cpu = torch.zeros(4, 3)  # paging needs CUDA: on the CPU the saved tensor is used as it is
    assert _state_buffer(optimizer, on_cpu, "state1", saved) is saved and len(made) == 1


def test_resume_skips_a_damaged_newest_checkpoint(tiny_run, home, tmp_path):
    """A truncated adapter in the newest checkpoint fails its manifest: resume names it, takes the
    previous one, redoes the steps without duplicating their metrics and ends with the same bytes."""
    import shutil

    out, _ = tiny_run
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy)
    weights = copy / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (copy / "checkpoints" / ".step-000006.tmp-abc123").mkdir()  # a killed save's leftover
    result = run_cli("train", str(TINY), f"output.dir={copy}", "--resume", "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stderr and "step-000004" in result.stderr
    assert "resumed from" in result.stdout and "step-000002" in result.stdout
    steps = [r["step"] for r in read_metrics(copy) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the redone steps replace their earlier records
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    for name in ("adapter/adapter_model.safetensors", "checkpoints/step-000004/adapter/adapter_model.safetensors"):
        assert (copy / name).read_bytes() == (out / name).read_bytes()  # bit-identical, deterministic bytes


def test_a_tampered_state_is_refused_with_a_message(tiny_run, home, tmp_path):
    import shutil

    out, _ = tiny_run
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000004")
    state = copy / "checkpoints" / "step-000002" / "trainer_state.rank0.pt"
    state.write_bytes(state.read_bytes()[:-64] + b"\0" * 64)
    result = run_cli("train", str(TINY), f"output.dir={copy}", "--resume", "--samples", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not match the checksum" in result.stderr and "no complete checkpoint" in result.stderr
