"""One reader for adapters: a malformed or inconsistent adapter folder is refused the same way by
eval / generate (`read_adapter_weights`, `AdapterSet`), merge, combine and `load_adapter`: exit 2,
one line naming the file and field or tensor, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.adapters.combine import combine_adapters
from qlora.adapters.merge import merge_adapter
from qlora.adapters.multi import AdapterSet
from qlora.adapters.peft_format import load_adapter, read_adapter_weights, save_adapter
from qlora.adapters.spec import AdaLoraSchedule, LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.cli import main
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.nn.adalora import AdaLoRALinear
from tiny_models import save_tiny, saved_adapter

SPEC = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj"))
ADA = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj"),
               adalora=AdaLoraSchedule(target_r=2, tinit=1, tfinal=1, total_step=4))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny("llama", root / "base")
    saved_adapter(base, root / "lora", SPEC)
    model = load_model(base, quant=None)
    apply_lora(model, ADA)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdaLoRALinear):
                layer.lora_E.normal_()
                layer.apply_rank_mask(torch.tensor([True, False, True, True]))
    save_adapter(model, root / "adalora", ADA, str(base))
    return {"base": base, "lora": root / "lora", "adalora": root / "adalora", "model": load_model(base, quant=None)}


def variant(made, tmp_path, source: str, config=None, tensors=None) -> Path:
    """A copy of adapter `source` with its config (a function of the dict) or tensors changed."""
    out = tmp_path / f"bad-{source}"
    shutil.copytree(made[source], out)
    if config is not None:
        (out / "adapter_config.json").write_text(json.dumps(config(json.loads((out / "adapter_config.json").read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(str(out / "adapter_model.safetensors"))), str(out / "adapter_model.safetensors"))
    return out


def readers(made, folder: Path, tmp_path: Path, needs_base: bool = False):
    """Every way a command reads an adapter (`needs_base`: the check needs the base's modules)."""
    ways = {
        "AdapterSet": lambda: AdapterSet(made["model"], "fp32").load_adapter(folder, "x"),
        "load_adapter": lambda: load_adapter(load_model(made["base"], quant=None), folder),
        "merge": lambda: merge_adapter(folder, tmp_path / "out-merge"),
        "combine": lambda: combine_adapters([folder], [1.0], tmp_path / "out-combine", "cat"),
    }
    if not needs_base:
        ways["read_adapter_weights (eval, generate)"] = lambda: read_adapter_weights(folder)
    return ways


def assert_refused_everywhere(made, folder, tmp_path, message, needs_base=False):
    for way, read in readers(made, folder, tmp_path, needs_base).items():
        with pytest.raises(UsageError, match=message):
            read()
            pytest.fail(f"{way} accepted it")
        assert not list(tmp_path.glob("out-*")), way


def setting(**fields):
    return lambda config: {**config, **fields}


LORA_CONFIGS = [
    ("r-too-big", setting(r=16), r"r=16; expected \(r, in\)"),
    ("r-zero", setting(r=0), r"r=0; expected an int >= 1"),
    ("r-negative", setting(r=-1), r"r=-1; expected an int >= 1"),
    ("r-float", setting(r=4.0), r"r=4.0; expected an int >= 1"),
    ("alpha-string", setting(lora_alpha="16"), r"lora_alpha='16'; expected a finite number"),
    ("dropout", setting(lora_dropout=1.5), r"lora_dropout=1.5"),
    ("list", lambda config: [config], "expected a JSON object"),
    ("targets-type", setting(target_modules=7), "target_modules=7"),
    ("adalora-config", setting(peft_type="ADALORA", init_r=4), "a LoRA tensor, but the config says ADALORA"),
    ("dora-flag", setting(use_dora=True), "DoRA"),  # AdapterSet refuses DoRA first; the others: no magnitudes
]


@pytest.mark.parametrize("case, config, message", LORA_CONFIGS, ids=[c[0] for c in LORA_CONFIGS])
def test_malformed_lora_configs_are_refused_by_every_reader(made, tmp_path, case, config, message):
    assert_refused_everywhere(made, variant(made, tmp_path, "lora", config=config), tmp_path, message)


def _pattern(value):
    def edit(config):
        key = next(iter(config["rank_pattern"]))
        return {**config, "rank_pattern": value if not callable(value) else {**config["rank_pattern"], key: value(config)}}
    return edit


ADALORA_CONFIGS = [
    ("pattern-string", _pattern("all"), r"rank_pattern='all'"),
    ("pattern-list", _pattern([True, False, True, True]), r"rank_pattern=\[True"),
    ("pattern-longer", _pattern(lambda c: [True, False, True, True, True]), "a list of init_r = 4"),
    ("pattern-empty", _pattern(lambda c: []), "a list of init_r = 4"),
    ("pattern-all-false", _pattern(lambda c: [False] * 4), r"rank_pattern keeps 0 of init_r = 4"),
    ("pattern-strings", _pattern(lambda c: ["yes"] * 4), "a list of init_r = 4"),
    ("pattern-unknown", lambda c: {**c, "rank_pattern": {**c["rank_pattern"], "model.nothing.lora_E": [True] * 4}},
     "rank_pattern names modules with no tensors"),
    ("init-r", setting(init_r=6), "init_r = 6"),
    ("init-r-zero", setting(init_r=0), "init_r=0"),
    ("lora-config", setting(peft_type="LORA", r=4, rank_pattern=None), "an AdaLoRA tensor, but the config says LORA"),
]


@pytest.mark.parametrize("case, config, message", ADALORA_CONFIGS, ids=[c[0] for c in ADALORA_CONFIGS])
def test_malformed_adalora_configs_are_refused_by_every_reader(made, tmp_path, case, config, message):
    if case == "init-r":  # a pattern entry then disagrees in length: check the tensors without one
        config = (lambda edit: lambda c: {**edit(c), "rank_pattern": None})(config)
        message = r"but init_r = 6; expected \(6, in\)"
    assert_refused_everywhere(made, variant(made, tmp_path, "adalora", config=config), tmp_path, message)


def _set(key, make):
    return lambda tensors: {**tensors, key: make(tensors[key])}


TENSORS = [
    ("nan", _set(f"{Q0}.lora_B.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
     rf"tensor '{Q0}.lora_B.weight' has 4 non-finite value\(s\)"),
    ("inf", _set(f"{Q0}.lora_A.weight", lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))), "non-finite"),
    ("int8", _set(f"{Q0}.lora_A.weight", lambda t: t.to(torch.int8)), r"lora_A.weight' has dtype int8"),
    ("none", lambda tensors: {}, "holds no tensors"),
    ("unpaired", lambda tensors: {k: v for k, v in tensors.items() if k != f"{Q0}.lora_B.weight"}, "lacks"),
    ("stray", lambda tensors: {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)},
     "not an adapter tensor PEFT names"),
]


@pytest.mark.parametrize("case, tensors, message", TENSORS, ids=[c[0] for c in TENSORS])
def test_bad_tensors_are_refused_by_every_reader(made, tmp_path, case, tensors, message):
    assert_refused_everywhere(made, variant(made, tmp_path, "lora", tensors=tensors), tmp_path, message)


def _renamed(old: str, new: str):
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


BASE_FITS = [
    ("targets-fewer", setting(target_modules=["q_proj"]), None, "tensors for modules it does not select"),
    ("targets-more", setting(target_modules=["q_proj", "v_proj", "k_proj"]), None, "selects modules with no tensors"),
    ("targets-none", setting(target_modules=["q_proj", "nope"]), None, "'nope' matches no linear module"),
    ("absent-module", setting(target_modules="model\\.layers\\.[0-9]+\\.self_attn\\.(q|v)_proj"),
     _renamed("layers.1.", "layers.7."), "modules the base model does not have"),
    ("shape", None, _set(f"{Q0}.lora_A.weight", lambda t: torch.zeros(4, 32)), "is 32 -> 64 in the adapter"),
]


@pytest.mark.parametrize("case, config, tensors, message", BASE_FITS, ids=[c[0] for c in BASE_FITS])
def test_adapters_that_do_not_fit_the_base_are_refused_by_every_reader(made, tmp_path, case, config, tensors, message):
    folder = variant(made, tmp_path, "lora", config=config, tensors=tensors)
    assert_refused_everywhere(made, folder, tmp_path, message, needs_base=True)


def test_good_adapters_still_read_everywhere(made, tmp_path):
    for source in ("lora", "adalora"):
        for way, read in readers(made, made[source], tmp_path / source).items():
            read()
            if way == "AdapterSet":
                made["model"] = load_model(made["base"], quant=None)  # a fresh base for the next reader


def test_the_cli_exits_2_naming_the_field(made, tmp_path, capsys):
    bad = variant(made, tmp_path, "lora", config=setting(r=16))
    for argv in (["generate", str(made["base"]), "quant.enabled=false", "--adapter", str(bad), "--prompt", "hi"],
                 ["merge", str(bad), str(tmp_path / "m")],
                 ["combine", str(tmp_path / "c"), "--adapter", str(bad), "--method", "cat"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "adapter_model.safetensors" in err and "r=16" in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_combine_refuses_a_non_finite_weight(made, tmp_path, capsys, weight):
    assert main(["combine", str(tmp_path / "c"), "--adapter", f"{made['lora']}:{weight}", "--method", "cat"]) == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
