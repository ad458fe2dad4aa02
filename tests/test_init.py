"""LoftQ and PiSSA initialisation (qlora/adapters/init.py): the maths per layer, and runs that use them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qlora.adapters.init import init_layer, lowrank_factors
from qlora.adapters.spec import LoraSpec
from qlora.errors import UsageError
from qlora.nn import Linear4bit
from qlora.quant.format import QuantFormat
from qlora.run_dir import read_metrics
from test_train import TINY, home, run_cli  # noqa: F401  (home: a fixture)

FMT = QuantFormat()


def weight(out: int = 96, inp: int = 128, seed: int = 0) -> torch.Tensor:
    """A bf16 weight with a decaying spectrum (as trained weights have) plus noise."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out, 32, generator=g), torch.randn(32, inp, generator=g)
    low = (u * torch.logspace(0, -1.5, 32)[None, :]) @ v
    return (low + 0.05 * torch.randn(out, inp, generator=g)).bfloat16()


def error(w: torch.Tensor, layer: Linear4bit, factors=None, scaling: float = 1.0) -> float:
    """||W - (dequant(Q) + s B A)||_F / ||W||_F."""
    approx = layer.dequantize().float()
    if factors is not None:
        a, b = factors
        approx = approx + scaling * b @ a
    return ((w.float() - approx).norm() / w.float().norm()).item()


def test_lowrank_factors_reproduce_a_rank_r_matrix():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(40, 8, generator=g) @ torch.randn(8, 50, generator=g)
    a, b = lowrank_factors(m, 8, scaling=2.0)
    assert a.shape == (8, 50) and b.shape == (40, 8)
    torch.testing.assert_close(2.0 * b @ a, m, rtol=1e-4, atol=1e-4)


def test_loftq_one_iteration_keeps_the_standard_base_and_fits_its_error():
    w, spec = weight(), LoraSpec(r=16, alpha=32, init="loftq")
    layer, factors = init_layer(w, None, FMT, spec)
    plain = Linear4bit.quantize(w, FMT)
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.dequantize(), plain.dequantize())
    before, after = error(w, plain), error(w, layer, factors, spec.scaling)
    assert after < 0.8 * before, (before, after)  # measured 0.68x on this weight
    more, more_factors = init_layer(w, None, FMT, LoraSpec(r=16, alpha=32, init="loftq", loftq_iters=3))
    assert not torch.equal(more.weight, plain.weight)
    assert error(w, more, more_factors, spec.scaling) <= after * 1.02  # more alternations do not hurt


def test_pissa_puts_the_principal_part_in_the_adapter():
    w, spec = weight(), LoraSpec(r=16, alpha=16, init="pissa")
    layer, (a, b) = init_layer(w, None, FMT, spec)
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    best = (u[:, :16] * s[:16]) @ vh[:16]
    residual = lambda m: (w.float() - m).norm().item()  # noqa: E731
    # randomised (q = r, 4 power iterations): near the optimal rank-16 residual (measured within 1%)
    assert residual(best) <= residual(spec.scaling * b @ a) < 1.05 * residual(best)
    assert error(w, layer, (a, b), spec.scaling) < 0.5 * error(w, Linear4bit.quantize(w, FMT))  # measured 0.2x


def test_rank_above_the_layer_is_refused():
    with pytest.raises(UsageError, match=r"lora.r=200 .* q_proj.weight is 96 x 128, so the rank can be at most 96"):
        init_layer(weight(), None, FMT, LoraSpec(r=200, init="pissa"), "q_proj.weight")


@pytest.mark.parametrize("override, words", [
    ("lora.init=svd", ["lora.init", "svd", "pissa"]),
    ("lora.r=100", ["lora.r=100", "at most 64"]),
    ("lora.loftq_iters=0", ["lora.loftq_iters"]),
])
def test_bad_init_settings_exit_2(tmp_path, override, words):
    result = run_cli("train", str(TINY), f"output.dir={tmp_path / 'x'}", "lora.init=pissa", override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and all(w in result.stderr for w in words), result.stderr[-2000:]


def test_init_needs_a_4bit_base(tmp_path):
    result = run_cli("train", str(TINY), f"output.dir={tmp_path / 'x'}", "lora.init=loftq", "quant.enabled=false")
    assert result.returncode == 2 and "quant.enabled=true" in result.stderr


@pytest.fixture(scope="module")
def pissa_run(home, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "pissa"
    result = run_cli("train", str(TINY), f"output.dir={out}", "lora.init=pissa")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_peft_on_the_saved_base_computes_our_logits(pissa_run, monkeypatch):
    """transformers loads the saved 4-bit base (bitsandbytes) and PEFT the adapter: our logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qlora.inference.target import load_for_inference, resolve_target
    from test_adapter import assert_same_model, logits

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, *_ = load_for_inference(resolve_target(str(pissa_run), []), "cpu")
    plain, *_ = load_for_inference(resolve_target(str(pissa_run), [], base_only=True), "cpu")
    base = AutoModelForCausalLM.from_pretrained(pissa_run / "base", device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, pissa_run / "adapter")
    assert_same_model(logits(theirs), logits(ours), logits(plain))


def test_pissa_run_saves_its_base_and_eval_and_merge_use_it(pissa_run, tmp_path):
    out = pissa_run
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    summary = json.loads((out / "summary.json").read_text())
    measured = run_cli("eval", str(out), "--json", str(tmp_path / "eval.json"))
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["eval_loss"] == pytest.approx(
        summary["eval_after"]["eval_loss"], rel=1e-6)
    merged = run_cli("merge", str(out / "adapter"), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    again = run_cli("eval", str(tmp_path / "merged"), "quant.enabled=false", "--json", str(tmp_path / "m.json"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["eval_loss"] == pytest.approx(
        summary["eval_after"]["eval_loss"], rel=2e-2)  # the merged bf16 model: one rounding of each weight

    # resume from step 2 (moved folder): the saved base is loaded, not re-initialised; steps 3-4 match
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(moved / "checkpoints" / "step-000004")
    shutil.rmtree(moved / "adapter")
    resumed = run_cli("train", str(TINY), f"output.dir={moved}", "lora.init=pissa", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert losses(moved)[-2:] == losses(out)[2:]
