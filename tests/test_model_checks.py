"""Damaged model folders are refused naming the tensor and file: a NaN / Inf weight, an int8
tensor where a float weight belongs, and checkpoint tensors the config has no place for (a
config.json with fewer layers than the weights), by the loader that train, eval and quantize use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.cli import main
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.quant.format import QuantFormat
from tiny_models import save_tiny

DOWN = "model.layers.0.mlp.down_proj.weight"


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("model") / "base")


def damaged(base, tmp_path, key, change):
    out = tmp_path / "damaged"
    shutil.copytree(base, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[3] = value
    return t


@pytest.mark.parametrize("key, change, message", [
    (DOWN, nan_at, rf"tensor '{DOWN}' has 1 non-finite"),  # quantised
    ("model.embed_tokens.weight", lambda t: nan_at(t, float("inf")), "'model.embed_tokens.weight' has 1 non-finite"),
    ("model.norm.weight", nan_at, "'model.norm.weight' has 1 non-finite"),  # kept 16-bit
    (DOWN, lambda t: t.to(torch.int8), rf"tensor '{DOWN}' has dtype int8, but a floating-point weight belongs"),
])
@pytest.mark.parametrize("quant", [QuantFormat(), None], ids=["nf4", "bf16"])
def test_damaged_weights_are_named_with_their_file(base, tmp_path, key, change, message, quant):
    folder = damaged(base, tmp_path, key, change)
    with pytest.raises(UsageError, match=message) as err:
        load_model(folder, quant=quant)
    assert "model.safetensors" in str(err.value)


def test_quantize_exits_2_on_a_nan_weight_and_writes_nothing(base, tmp_path, capsys):
    folder = damaged(base, tmp_path, DOWN, nan_at)
    assert main(["quantize", str(folder), str(tmp_path / "q4")]) == 2
    err = capsys.readouterr().err
    assert DOWN in err and "model.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "q4").exists()


def test_a_config_with_fewer_layers_than_the_weights_is_refused(base, tmp_path, capsys):
    out = tmp_path / "short"
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    for quant in (QuantFormat(), None):
        with pytest.raises(UsageError, match=r"tensor\(s\) in model.safetensors have no place.*model\.layers\.1\."):
            load_model(out, quant=quant)
    assert main(["quantize", str(out), str(tmp_path / "q4")]) == 2
    assert "model.layers.1." in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama-tied", "gpt2", "qwen2", "phi3"])
def test_good_folders_have_no_unused_tensors(tmp_path, family):
    """Tied heads, GPT-2's saved attention masks and the like are what transformers ignores too."""
    folder = save_tiny(family, tmp_path / family)
    load_model(folder, quant=QuantFormat())
