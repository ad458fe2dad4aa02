"""A small run of tools/chaos.py: one trial of each kind must survive (the README shows a bigger one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chaos_trials_all_survive():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "chaos.py"), "--trials", "1", "--steps", "4"],
                            capture_output=True, text=True, timeout=1200, env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "tried" not in line]
    assert len(rows) >= 7 and all(" | 1 | 1 | " in row for row in rows), result.stdout
    assert any("--overwrite" in row for row in rows) and any("lock race" in row for row in rows)
    assert "0/1" not in result.stdout  # every comparable trial ended bit-identical
