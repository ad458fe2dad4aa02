"""tools/gpu_check.py, the one prepared device check, runs end to end at toy sizes on the CPU.

On the CPU the device path is the native backend, so `exact` compares it with the reference; the
65B section builds a scaled-down model layer by layer with the same code the GPU run uses. The
full smoke run (every section, the transformers + PEFT + bitsandbytes peer included) is slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


def run(tmp_path, sections: str) -> list[dict]:
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--smoke", "--device", "cpu", "--sections", sections, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == set(sections.split(","))
    return rows, status


def test_exactness_and_the_65b_section_at_toy_sizes(tmp_path):
    rows, status = run(tmp_path, "exact,65b")
    assert status == 0 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert len([r for r in rows if r["section"] == "exact"]) == 3 * 2 * 2  # types x block sizes x dq


@pytest.mark.slow
def test_every_section_runs(tmp_path):
    rows, _ = run(tmp_path, "exact,bnb,speed,step,65b")
    assert not [r for r in rows if r["name"] == "section failed"]
    assert any(r["section"] == "step" and r["name"] == "ours / peer tokens/s" for r in rows)
