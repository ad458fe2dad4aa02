"""`qlora combine`: every method against PEFT's `add_weighted_adapter` on the same adapters (of
different ranks, scalings and target sets), DARE's masks made comparable by seeding, and the
refusals (exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qlora.adapters.combine import combine, module_seed, read_adapter
from qlora.adapters.peft_format import read_adapter_weights, write_adapter
from qlora.cli import main
from tiny_models import save_tiny

peft = pytest.importorskip("peft")

Q0 = "model.layers.0.self_attn.q_proj"


def _peft_adapter(base, out, seed, r, alpha, targets):
    """A PEFT LoRA adapter (fp32) with random A and B, saved with PEFT's own writer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():  # PEFT's B starts at zero and its keys read `lora_B.default.weight`
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = save_tiny("llama", root / "base")
    return {
        "base": base,
        "a": _peft_adapter(base, root / "a", 1, 4, 8, ["q_proj", "v_proj"]),
        "b": _peft_adapter(base, root / "b", 2, 8, 8, ["v_proj", "down_proj"]),  # other rank, other targets
        "c": _peft_adapter(base, root / "c", 3, 4, 16, ["q_proj", "up_proj"]),  # rank of a, other scaling
        # one module each, so DARE's masks come from one seeded generator in both implementations
        "d1": _peft_adapter(base, root / "d1", 4, 4, 8, Q0.replace(".", r"\.")),
        "d2": _peft_adapter(base, root / "d2", 5, 4, 4, Q0.replace(".", r"\.")),
    }


def peft_combined(folders, names, weights, method, **kwargs):
    """PEFT's add_weighted_adapter result as a PEFT-keyed state dict (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["base"], torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type=method, **kwargs)
    return peft.get_peft_model_state_dict(model, adapter_name="mix")


def seed_first_mask(monkeypatch, seed):
    """Seed torch's global generator right before PEFT draws its first DARE mask (adding the new
    adapter draws its random init from the same generator first)."""
    from peft.utils import merge_utils

    draw, calls = merge_utils.random_pruning, []

    def seeded(*args, **kwargs):
        if not calls:
            torch.manual_seed(seed)
        calls.append(1)
        return draw(*args, **kwargs)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    return calls


def ours(folders, names, weights, method, **kwargs):
    return combine([read_adapter(folders[n]) for n in names], weights, method, **kwargs)


@pytest.mark.parametrize("method, names, kwargs", [
    ("linear", ["a", "c"], {}),
    ("ties", ["a", "c"], {"density": 0.5}),
    ("magnitude_prune", ["a", "c"], {"density": 0.3}),
    ("cat", ["a", "b"], {}),
])
def test_factor_methods_equal_peft(folders, method, names, kwargs):
    tensors, config = ours(folders, names, [0.7, -1.3], method, **kwargs)
    expected = peft_combined(folders, names, [0.7, -1.3], method, **kwargs)
    assert tensors.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(tensors[key], expected[key], rtol=0, atol=0, msg=key)
    assert config["r"] == config["lora_alpha"] == expected[next(iter(expected))].shape[0]


@pytest.mark.parametrize("method, kwargs", [
    ("svd", {}), ("svd", {"rank": 3}), ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.4}),
])
def test_svd_methods_equal_peft(folders, method, kwargs):
    """Different ranks and targets; compared as B @ A (SVD factors are unique only up to sign)."""
    names, weights = ["a", "b"], [1.0, 0.5]
    tensors, _ = ours(folders, names, weights, method, **kwargs)
    peft_kwargs = {"svd_rank": kwargs["rank"]} if "rank" in kwargs else {"density": kwargs.get("density")}
    expected = peft_combined(folders, names, weights, method, **peft_kwargs)
    for key in [k for k in expected if ".lora_A." in k]:
        b_key = key.replace(".lora_A.", ".lora_B.")
        assert tensors[key].shape == expected[key].shape
        torch.testing.assert_close(tensors[b_key] @ tensors[key], expected[b_key] @ expected[key],
                                   rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_equals_peft_with_the_module_seed(folders, method, monkeypatch):
    """PEFT draws DARE's masks from torch's global generator; seeded with our per-module seed, it
    draws the same masks as ours (one adapted module, so one generator covers all draws)."""
    tensors, _ = ours(folders, ["d1", "d2"], [1.0, 0.8], method, density=0.6, seed=7)
    calls = seed_first_mask(monkeypatch, module_seed(7, Q0))
    expected = peft_combined(folders, ["d1", "d2"], [1.0, 0.8], method, density=0.6)
    assert len(calls) == (2 if method.endswith("_svd") else 4)
    lora_A, lora_B = (f"base_model.model.{Q0}.lora_{f}.weight" for f in "AB")
    got, want = tensors[lora_B] @ tensors[lora_A], expected[lora_B] @ expected[lora_A]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(tensors[lora_A], ours(folders, ["d1", "d2"], [1.0, 0.8], method, density=0.6,
                                                 seed=8)[0][lora_A])  # another seed, other masks


def test_dare_is_unbiased_over_seeds(folders):
    """Over many seeds (all modules, rescaled by 1 / density), DARE's mean is the linear blend."""
    linear, _ = ours(folders, ["a", "c"], [0.7, 0.3], "linear")
    runs = [ours(folders, ["a", "c"], [0.7, 0.3], "dare_linear", density=0.5, seed=s)[0] for s in range(300)]
    for key, value in linear.items():
        mean = torch.stack([run[key] for run in runs]).mean(0)
        spread = value.abs().mean()
        assert (mean - value).abs().mean() < 0.1 * spread, key  # standard error ~ 1/sqrt(300) of the entries
        kept = torch.stack([(run[key] != 0).float().mean() for run in runs]).mean()
        assert 0.45 < kept < 0.80, key  # each factor keeps 1 - (1 - d)^2 = 0.75 of entries where both overlap


def test_cat_is_exact_and_peft_loads_it(folders, tmp_path):
    """cat's B @ A is exactly the weighted sum of the deltas, and PEFT loads the written folder."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cat"
    assert main(["combine", str(out), "--adapter", f"{folders['a']}:0.5", "--adapter", str(folders["b"]),
                 "--method", "cat"]) == 0
    written = read_adapter(out)
    a, b = read_adapter(folders["a"]), read_adapter(folders["b"])
    fqn = "model.layers.1.self_attn.v_proj"  # in both
    want = sum(w * x.spec.scaling * x.pairs[fqn][1] @ x.pairs[fqn][0] for w, x in ((0.5, a), (1.0, b)))
    got_A, got_B = written.pairs[fqn]
    torch.testing.assert_close(written.spec.scaling * got_B @ got_A, want, rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(folders["base"], torch_dtype=torch.float32)
    loaded = peft.get_peft_model_state_dict(peft.PeftModel.from_pretrained(model, out))
    assert set(loaded) == set(read_adapter_weights(out))


def test_merge_writes_the_combined_model(folders, tmp_path):
    from qlora.adapters.merge import merge_state_dict
    from safetensors.torch import load_file

    tensors, config = ours(folders, ["a", "c"], [1.0, 1.0], "linear", dtype=torch.bfloat16)
    out = tmp_path / "merged"
    assert main(["combine", str(out), "--adapter", str(folders["a"]), "--adapter", str(folders["c"]),
                 "--method", "linear", "--merge"]) == 0
    base = load_file(str(folders["base"] / "model.safetensors"))
    spec = read_adapter(folders["a"]).spec.__class__(r=config["r"], alpha=config["lora_alpha"])
    want = merge_state_dict(base, tensors, spec)
    got = load_file(str(out / "model.safetensors"))
    key = f"{Q0}.weight"
    assert torch.equal(got[key], want[key]) and not torch.equal(got[key], base[key])


def _misfit(folders, tmp_path):
    """A copy of adapter a whose q_proj A has another input width: made for another model."""
    bad = tmp_path / "misfit"
    shutil.copytree(folders["a"], bad)
    tensors = read_adapter_weights(bad)
    key = f"base_model.model.{Q0}.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 32)
    write_adapter(bad, tensors, json.loads((bad / "adapter_config.json").read_text()))
    return bad


def _other_base(folders, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(folders["c"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "some/other"}))
    return other


@pytest.mark.parametrize("case, args, message", [
    ("ranks", ["a", "b", "--method", "ties", "--density", "0.5"], "needs one rank for all"),
    ("base", ["a", "other", "--method", "cat"], "different bases"),
    ("shape", ["a", "misfit", "--method", "cat"], "not made for the same model"),
    ("density", ["a", "c", "--method", "ties"], "--density is needed"),
    ("density-range", ["a", "c", "--method", "dare_linear", "--density", "0"], "in (0, 1]"),
    ("density-unused", ["a", "c", "--method", "linear", "--density", "0.5"], "only by"),
    ("rank-not-svd", ["a", "c", "--method", "cat", "--rank", "2"], "only with an _svd method"),
    ("rank-too-big", ["a", "b", "--method", "svd", "--rank", "65"], "exceeds min(in, out)"),
])
def test_refusals_exit_2_and_write_nothing(folders, tmp_path, capsys, case, args, message):
    paths = {**folders, "other": _other_base(folders, tmp_path), "misfit": _misfit(folders, tmp_path)}
    first, second, *rest = args
    out = tmp_path / "out"
    argv = ["combine", str(out), "--adapter", str(paths[first]), "--adapter", str(paths[second]), *rest]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
