"""The command line: instant help (no heavy imports), every sub-command present."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora.cli import COMMANDS


def test_help_imports_no_heavy_library():
    code = ("import sys, qlora.cli; qlora.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "qlora.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"usage: qlora {command}" in out.stdout


def test_unknown_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "fly"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_overrides_may_follow_options(tmp_path):
    """`qlora train RECIPE --overwrite key=value` keeps the override (it reaches validation)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_smoke.yaml"
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), "--overwrite",
                          f"output.dir={tmp_path / 'x'}", "lora.rr=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "lora.rr" in out.stderr
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), "--bogus"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
