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
