"""`--overwrite` of merge / quantize / combine replaces only a folder the same command wrote: never a
run, a live run, a folder of runs, the command's own input, or a folder qlora did not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora.adapters.spec import LoraSpec
from qlora.cli import main
from qlora.outputs import PROVENANCE, remove_stale_temps
from test_lock import live_pid  # noqa: F401  (a fixture)
from tiny_models import save_tiny, saved_adapter

SPEC = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite")
    base = save_tiny("llama", root / "base")
    run = root / "runs" / "a"
    saved_adapter(base, run / "adapter", SPEC)
    (run / "recipe.yaml").write_text(f"model:\n  name_or_path: {base}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (root / "runs" / "b").mkdir()
    (root / "runs" / "b" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (root / "runs" / "notes.txt").write_text("mine")
    return {"base": base, "adapter": run / "adapter", "run": run, "runs": root / "runs"}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_merge_refuses_a_folder_of_runs_and_a_run(made, capsys):
    before = tree(made["runs"])
    refused(capsys, ["merge", str(made["adapter"]), str(made["runs"]), "--overwrite"], "holds this command's input")
    refused(capsys, ["merge", str(made["adapter"]), str(made["run"]), "--overwrite"], "holds this command's input")
    refused(capsys, ["merge", str(made["adapter"]), str(made["runs"] / "b"), "--overwrite"], "is a qlora run folder")
    other = made["runs"].parent / "elsewhere"
    other.mkdir(exist_ok=True)
    (other / "x").mkdir(exist_ok=True)
    (other / "x" / "recipe.yaml").write_text("{}\n")
    refused(capsys, ["merge", str(made["adapter"]), str(other), "--overwrite"], "holds qlora runs (x)")
    assert tree(made["runs"]) == before


def test_merge_refuses_a_live_run(made, tmp_path, capsys, live_pid):
    live = tmp_path / "live"
    live.mkdir()
    lock = {"pid": live_pid, "host": os.uname().nodename, "started": time.time() - 1}
    (live / "run.lock").write_text(json.dumps(lock))
    (live / "metrics.jsonl").write_text('{"step": 63, "loss": 1.0}\n')
    before = tree(live)
    refused(capsys, ["merge", str(made["adapter"]), str(live), "--overwrite"], f"live run (pid {live_pid}")
    assert tree(live) == before


def test_quantize_refuses_its_own_input_and_folders_it_did_not_write(made, tmp_path, capsys):
    before = tree(made["base"])
    refused(capsys, ["quantize", str(made["base"]), str(made["base"]), "--overwrite"], "is this command's input")
    assert tree(made["base"]) == before
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "weights.safetensors").write_text("someone's")
    refused(capsys, ["quantize", str(made["base"]), str(foreign), "--overwrite"], "was not written by qlora")
    refused(capsys, ["quantize", str(made["base"]), str(foreign / "weights.safetensors"), "--overwrite"],
            "is a file")
    assert (foreign / "weights.safetensors").read_text() == "someone's"


def test_each_writer_replaces_what_it_wrote_and_only_that(made, tmp_path, capsys):
    merged, q4, combined = tmp_path / "merged", tmp_path / "q4", tmp_path / "combined"
    for _ in range(2):  # the second time replaces the first's output
        assert main(["merge", str(made["adapter"]), str(merged), "--overwrite"]) == 0
        assert main(["quantize", str(made["base"]), str(q4), "--overwrite"]) == 0
        assert main(["combine", str(combined), "--adapter", str(made["adapter"]), "--method", "cat", "--overwrite"]) == 0
    assert json.loads((merged / PROVENANCE).read_text())["written_by"] == "qlora merge"
    assert json.loads((q4 / PROVENANCE).read_text())["kind"] == "quantized"
    refused(capsys, ["quantize", str(made["base"]), str(merged), "--overwrite"], "holds a merged model written by qlora merge")
    refused(capsys, ["merge", str(made["adapter"]), str(q4), "--overwrite"], "quantized model written by qlora quantize")
    refused(capsys, ["combine", str(made["adapter"]), "--adapter", str(combined), "--method", "cat", "--overwrite"],
            "was not written by qlora")  # a run's own adapter is not combine's to replace
    refused(capsys, ["combine", str(combined), "--adapter", str(combined), "--method", "cat", "--overwrite"],
            "is this command's input")
    refused(capsys, ["merge", str(made["adapter"]), str(merged)], "already exists; choose another path or pass --overwrite")


def test_train_overwrite_refuses_a_merged_folder(made, tmp_path):
    from test_train import TINY, run_cli

    merged = tmp_path / "merged"
    assert main(["merge", str(made["adapter"]), str(merged)]) == 0
    (merged / "recipe.yaml").write_text("{}\n")  # merge copies a run's recipe: it must not look like a run
    before = tree(merged)
    result = run_cli("train", str(TINY), f"output.dir={merged}", "--overwrite")
    assert result.returncode == 2 and "holds a merged model, not a run" in result.stderr, result.stderr[-2000:]
    assert tree(merged) == before


def test_a_killed_writers_temporary_copy_is_removed(tmp_path, live_pid):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "merged"
    left = tmp_path / f".merged.tmp-{dead.pid}_ab12"
    busy = tmp_path / f".merged.tmp-{live_pid}_cd34"
    other = tmp_path / f".other.tmp-{dead.pid}_ef56"
    for folder in (left, busy, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 100)
    assert remove_stale_temps(out) == [left]
    assert busy.is_dir() and other.is_dir()
