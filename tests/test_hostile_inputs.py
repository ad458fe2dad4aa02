"""Hostile inputs that used to end in a traceback or run away: a 200k-deep nested JSON row (a
RecursionError) and `generate --max-new-tokens` far past the model's context."""

from __future__ import annotations

import json

import pytest

from qlora.cli import main
from qlora.data.checks import check_data_file
from qlora.errors import UsageError
from tiny_models import save_tiny


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_deeply_nested_row_is_named(tmp_path, suffix):
    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + deep + "}\n")
        where = "line 2"
    else:
        path.write_text('[{"text": ' + deep + "}]")
        where = "one JSON document"
    with pytest.raises(UsageError, match=f"{where}.*nested too deeply"):
        check_data_file(path, "json")


def test_generate_refuses_new_tokens_past_the_context(tmp_path, capsys, monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = save_tiny("llama", tmp_path / "base")  # max_position_embeddings 64
    tok.save_pretrained(base)
    argv = ["generate", str(base), "quant.enabled=false", "--no-chat", "--prompt", "a b c", "--max-new-tokens"]
    assert main([*argv, "100000000"]) == 2
    err = capsys.readouterr().err
    assert "exceed the model's context of 64 tokens; expected at most" in err and "Traceback" not in err
    from types import SimpleNamespace

    from qlora.inference.generate import check_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    check_context(model, 60, 4)  # fits exactly
    with pytest.raises(UsageError, match="expected at most 0 .*the prompt alone fills it"):
        check_context(model, 64, 1)
