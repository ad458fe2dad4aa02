"""Several adapters on one 4-bit base: switching equals loading each adapter alone, the base is never
touched, unloading frees, and a mixed-adapter batch equals running its rows separately."""

from __future__ import annotations

import pytest
import torch

from qlora.adapters.multi import AdapterSet
from qlora.adapters.peft_format import load_adapter, save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.nn import LoRALinear
from qlora.quant.format import QuantFormat
from tiny_models import randomise_lora_b, save_tiny, tokens

SPECS = {"a": LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj")),
         "b": LoraSpec(r=8, alpha=4, targets=("v_proj", "down_proj"))}  # other rank, scaling, targets


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base = save_tiny("llama", root / "base")
    out = {"base": base}
    for seed, (name, spec) in enumerate(SPECS.items(), start=3):
        model = load_model(base, quant=QuantFormat())
        apply_lora(model, spec)
        randomise_lora_b(model, seed=seed, std=0.2)
        out[name] = save_adapter(model, root / name, spec, str(base))
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def alone(folders, name, ids):
    """Logits of a fresh 4-bit base with only adapter `name` loaded the ordinary way."""
    model = load_model(folders["base"], quant=QuantFormat()).eval()
    if name is not None:
        load_adapter(model, folders[name])
    return logits(model, ids)


@pytest.fixture
def served(folders):
    model = load_model(folders["base"], quant=QuantFormat()).eval()
    adapters = AdapterSet(model)
    adapters.load_adapter(folders["a"], "a")
    adapters.load_adapter(folders["b"], "b")
    return model, adapters


def test_switching_equals_each_adapter_alone(folders, served):
    model, adapters = served
    ids = tokens(2, 12)
    assert torch.equal(logits(model, ids), alone(folders, None, ids))  # loading changes nothing
    for name in ("a", "b", "a"):
        adapters.set_adapter(name)
        assert torch.equal(logits(model, ids), alone(folders, name, ids)), name
    with adapters.disabled():
        assert torch.equal(logits(model, ids), alone(folders, None, ids))
    assert adapters.active == "a" and torch.equal(logits(model, ids), alone(folders, "a", ids))


def test_the_base_is_never_touched_and_memory_grows_by_the_adapters(folders, served):
    model, adapters = served
    base = {p.data_ptr(): p.clone() for name, p in model.named_parameters() if ".lora_" not in name}
    adapters.set_adapter("b")
    adapters.set_adapter("a")
    adapters.unload("b")  # also unwraps down_proj: its base weight changes name, not storage
    now = {p.data_ptr(): p for name, p in model.named_parameters() if ".lora_" not in name}
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)
    r_a, n_layers = SPECS["a"].r, 2
    q, v = 64 + 64, 64 + 32  # q_proj 64 -> 64, v_proj 64 -> 32 (2 of 4 heads): r * (in + out) each, bf16
    assert adapters.adapters["a"].nbytes == n_layers * r_a * (q + v) * 2


def test_unload_unwraps_and_keeps_the_rest(folders, served):
    model, adapters = served
    adapters.set_adapter("b")
    adapters.unload("b")
    wrapped = {fqn.split(".", 3)[-1] for fqn, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"self_attn.q_proj", "self_attn.v_proj"}  # down_proj went back to its base
    ids = tokens(2, 12)
    assert adapters.active is None and torch.equal(logits(model, ids), alone(folders, None, ids))
    adapters.set_adapter("a")
    assert torch.equal(logits(model, ids), alone(folders, "a", ids))
    with pytest.raises(UsageError, match="no adapter named 'b'; loaded: a"):
        adapters.set_adapter("b")


def test_mixed_batch_equals_rows_run_separately(folders, served):
    model, adapters = served
    rows = ["a", None, "b", "a"]
    ids = tokens(len(rows), 12, seed=5)
    adapters.set_adapter("b")
    with adapters.mixed(rows):
        mixed = logits(model, ids)
    assert adapters.active == "b"
    for i, name in enumerate(rows):
        adapters.set_adapter(name)
        whole = logits(model, ids)[i]  # the same batch, one adapter for all rows
        single = logits(model, ids[i: i + 1])[0]  # the row alone
        # Bit-equal on this machine (torch 2.13 CPU); a BLAS that blocks a matmul over fewer rows
        # differently may round differently, so one bf16 rounding (2**-8) of the largest logit is allowed.
        scale = whole.abs().max()
        assert (mixed[i] - whole).abs().max() <= 2 ** -8 * scale, name
        assert (mixed[i] - single).abs().max() <= 2 ** -8 * scale, name
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[0], mixed[2])


def test_refusals(folders, served, tmp_path):
    model, adapters = served
    with pytest.raises(UsageError, match="already loaded"):
        adapters.load_adapter(folders["a"], "a")
    with pytest.raises(UsageError, match="no adapter named 'c'"):
        with adapters.mixed(["a", "c"]):
            pass
    with adapters.mixed(["a", "b"]), pytest.raises(UsageError, match=r"batch=2"):
        logits(model, tokens(3, 12))
