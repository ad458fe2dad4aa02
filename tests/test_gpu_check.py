"""tools/gpu_check.py, the one prepared device check, runs end to end at toy sizes on the CPU,
also from a plain checkout on a bare image (no scipy, accelerate, bitsandbytes or peft).

On the CPU the device path is the native backend, so `exact` compares it with the reference; the
65B section builds a scaled-down model layer by layer with the same code the GPU run uses. The
full smoke run (every section, the transformers + PEFT + bitsandbytes peer included) is slow.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402,F401  (puts the repository and tools/ on sys.path)
from gpucheck import tables  # noqa: E402
from gpucheck.run import main  # noqa: E402
from gpucheck.sections import SECTIONS  # noqa: E402

BARE = ("scipy", "accelerate", "bitsandbytes", "peft")


def run(tmp_path, sections: str) -> tuple[list[dict], int]:
    out = tmp_path / "gpu_check.json"
    status = main(["--smoke", "--device", "cpu", "--sections", sections, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == set(sections.split(","))
    return rows, status


def test_exactness_and_the_65b_section_at_toy_sizes(tmp_path):
    rows, status = run(tmp_path, "exact,65b")
    assert status == 0 and all(r["ok"] is not False for r in rows), [r for r in rows if r["ok"] is False]
    assert len([r for r in rows if r["section"] == "exact"]) == 3 * 2 * 2  # types x block sizes x dq
    assert any("optimiser" in r["detail"] for r in rows if r["section"] == "65b")


def test_embedded_tables_equal_the_scipy_build():
    pytest.importorskip("scipy")
    from qlora.quant.codebooks import codebook, normal_float_levels

    assert tables.differing_tables() == []
    assert torch.equal(normal_float_levels().view(torch.int32), tables.embedded("nf4").view(torch.int32))
    assert codebook("nf4").tolist() == tables.NF4


def test_moe_sections_at_toy_sizes(tmp_path):
    rows, status = run(tmp_path, "moe,moe-step")
    assert not [r for r in rows if r["name"] == "section failed"]
    checked = {r["name"]: r["ok"] for r in rows if r["ok"] is not None}
    assert checked == {"4-bit experts forward vs grouped_mm on the dequantised weights": True,
                       "Mixtral-8x7B QLoRA step with expert LoRA under a 48 GiB cap": True}


def test_sections_are_one_list_of_named_functions():
    names = [s.name for s in SECTIONS]
    assert names == ["exact", "bnb", "speed", "step", "65b", "moe", "moe-step"] and len(set(names)) == len(names)
    assert all(callable(s.run) for s in SECTIONS)


def _bare_site(tmp_path: Path) -> Path:
    """This venv's site-packages without the packages a bare GPU image lacks (symlinks), and without
    .pth files: with `python -S` the editable install of qlora is not seen either."""
    bare = tmp_path / "site"
    bare.mkdir()
    for src in map(Path, site.getsitepackages()):
        for entry in src.iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in BARE or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
                continue
            if not (bare / entry.name).exists():
                (bare / entry.name).symlink_to(entry)
    return bare


@pytest.mark.slow
def test_smoke_passes_on_a_bare_image_from_a_plain_checkout(tmp_path):
    """`python tools/gpu_check.py --smoke`, run from another folder with no scipy, accelerate,
    bitsandbytes or peft importable and qlora not installed: exit 0, the preflight names each
    missing piece and its fix, the fallbacks run (embedded NF4 table, meta device, qlora's AdamW)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QLORA_BACKEND")}
    env.update(PYTHONPATH=str(_bare_site(tmp_path)), OMP_NUM_THREADS="1")
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-S", str(ROOT / "tools" / "gpu_check.py"), "--smoke",
                             "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"qlora from {ROOT}" in result.stdout
    report = json.loads(out.read_text())
    pre = report["preflight"]
    for name in BARE:
        assert pre[name]["ok"] is False and pre[name]["fix"], (name, pre[name])
    assert "embedded table" in pre["scipy"]["detail"] and pre["tables"]["ok"] is True
    assert "torch.device('meta')" in pre["accelerate"]["detail"]
    rows = report["rows"]
    assert [r for r in rows if r["section"] == "bnb"][0]["name"] == "skipped"
    assert all(r["ok"] for r in rows if r["section"] == "exact")
    assert any("optimiser adamw" in r["detail"] for r in rows if r["section"] == "65b")
    assert not [r for r in rows if r["name"] == "section failed"], rows


@pytest.mark.slow
def test_every_section_runs(tmp_path):
    rows, _ = run(tmp_path, "exact,bnb,speed,step,65b,moe,moe-step")
    assert not [r for r in rows if r["name"] == "section failed"]
    assert [r["ok"] for r in rows if r["section"] == "moe" and r["name"].startswith("4-bit experts forward")] == [True]
    assert any(r["section"] == "step" and r["name"] == "ours / peer tokens/s" for r in rows)
