"""Recipes: every shipped recipe validates; overrides; errors name the key, the value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qlora.config import LoraConfig, QuantConfig, TrainConfig
from qlora.recipe import load_recipe, recipe_from_dict, recipe_to_dict, save_recipe
from qlora.errors import UsageError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"smollm2_135m_chat_cpu", "tiny_smoke", "llama2_7b_qlora_24gb", "llama3_8b_qlora_24gb",
            "llama_65b_qlora_48gb", "llama3_8b_fsdp_2gpu"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_starts_with_its_command(path: Path):
    cfg = load_recipe(path)
    assert cfg.quant.format(cfg.model.dtype).bits_per_weight < 4.6  # every shipped recipe is a 4-bit QLoRA one
    assert cfg.lora.spec().scaling > 0 and cfg.train.max_steps != 0
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert re.fullmatch(rf"# .*\bqlora\)? train recipes/{re.escape(path.name)}", first), first
    # every key in the file is a real field (load_recipe would raise otherwise) and survives a round trip
    assert recipe_from_dict(recipe_to_dict(cfg)) == cfg


def test_paper_settings_in_gpu_recipes():
    for path in RECIPES:
        if "llama" not in path.stem:
            continue
        cfg = load_recipe(path)
        assert (cfg.quant.quant_type, cfg.quant.double_quant) == ("nf4", True)
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (64, 16.0, "all-linear")
        optimizer = "adamw" if cfg.train.distributed == "fsdp" else "paged_adamw_8bit"  # FSDP: DTensors
        assert (cfg.optim.name, cfg.optim.max_grad_norm, cfg.optim.scheduler) == (optimizer, 0.3, "constant")
        assert cfg.train.gradient_checkpointing and cfg.data.max_length == 512
    fsdp = load_recipe(RECIPES[[p.stem for p in RECIPES].index("llama3_8b_fsdp_2gpu")])
    assert (fsdp.train.distributed, fsdp.quant.quant_storage) == ("fsdp", "bf16")


def test_fsdp_needs_bf16_storage_and_torch_adamw(tmp_path: Path):
    path = write(tmp_path, "train:\n  distributed: fsdp\nquant:\n  quant_storage: bf16\n")
    with pytest.raises(UsageError, match="optim.name.*adamw"):
        load_recipe(path)
    with pytest.raises(UsageError, match="quant_storage"):
        load_recipe(path, ["quant.quant_storage=uint8", "optim.name=adamw"])
    assert load_recipe(path, ["optim.name=adamw"]).train.distributed == "fsdp"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_overrides(tmp_path: Path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    cfg = load_recipe(path, ["train.max_steps=10", "lora.targets=[q_proj,v_proj]", "optim.lr=1e-4",
                             "output.dir=2024", "optim.betas=[0.9, 0.95]", "train.epochs=null"])
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32.0  # file value, default
    assert cfg.train.max_steps == 10 and cfg.train.epochs is None
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; float fields accept it
    assert cfg.output.dir == "2024"  # a str field keeps the raw text YAML would read as an int
    assert cfg.optim.betas == (0.9, 0.95)
    assert load_recipe(path, ["lora.targets=re:.*_proj"]).lora.targets == "re:.*_proj"
    assert cfg.lora.target_parameters == []  # no expert LoRA unless asked
    assert load_recipe(path, ["lora.target_parameters=all-experts"]).lora.target_parameters == "all-experts"
    assert load_recipe(path, ["lora.target_parameters=[mlp.experts.down_proj]"]).lora.target_parameters == \
        ["mlp.experts.down_proj"]
    assert load_recipe(write(tmp_path, "lora:\n")).lora == LoraConfig()  # an empty section: its defaults


@pytest.mark.parametrize("text, override, needles", [
    ("lora:\n  rr: 8\n", None, ["lora.rr", "did you mean lora.r", "alpha, dropout"]),
    ("trian: {}\n", None, ["'trian'", "did you mean train", "model, quant, lora"]),
    ("lora:\n", "lora.rr=4", ["lora.rr", "did you mean lora.r"]),
    ("lora:\n", "max_steps=4", ["'max_steps=4'", "section.field=value"]),
    ("lora:\n", "train.max_steps", ["section.field=value"]),
    ("lora:\n  r: sixteen\n", None, ["lora.r", "'sixteen'", "expected int"]),
    ("lora:\n  r: 1.5\n", None, ["lora.r", "1.5", "expected int"]),
    ("train:\n  gradient_checkpointing: 1\n", None, ["train.gradient_checkpointing", "expected bool"]),
    ("quant:\n  skip_modules: lm_head\n", None, ["quant.skip_modules", "list[str]"]),
    ("optim:\n  betas: [0.9]\n", None, ["optim.betas", "tuple[float, float]"]),
    ("optim:\n  lr: fast\n", None, ["optim.lr", "'fast'", "expected float"]),
    ("optim:\n  name: adam\n", None, ["optim.name", "'adam'", "'paged_adamw_8bit'", "did you mean 'adamw'"]),
    ("model:\n  dtype: float16\n", None, ["model.dtype", "'float16'", "'bf16', 'fp16', 'fp32'"]),
    ("data:\n  format: jsonl\n", None, ["data.format", "'alpaca'", "'chat'"]),
    ("quant:\n  blocksize: 100\n", None, ["quant.blocksize", "100", "power of two"]),
    ("quant:\n  blocksize: 8192\n", None, ["quant.blocksize", "8192"]),
    ("lora:\n  dropout: 1.0\n", None, ["lora.dropout", "[0, 1)"]),
    ("lora:\n  targets: q_proj\n", None, ["lora.targets", "'q_proj'", "re:<regex>"]),
    ("lora:\n  targets: []\n", None, ["lora.targets", "non-empty"]),
    ("lora:\n  target_parameters: experts\n", None, ["lora.target_parameters", "'experts'", "'all-experts'"]),
    ("lora:\n  target_parameters: [' ']\n", None, ["lora.target_parameters", "expert parameter names"]),
    ("lora:\n  target_parameters: 3\n", None, ["lora.target_parameters", "str or list[str]"]),
    ("optim:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n", None, ["optim.warmup_steps", "not both"]),
    ("train:\n  max_steps: null\n  epochs: null\n", None, ["train.epochs", "train.max_steps"]),
    ("train:\n  micro_batch_size: 0\n", None, ["train.micro_batch_size", "from 1 to 65,536"]),
    ("train:\n  distributed: fsdp\n", None, ["quant.quant_storage", "'uint8'", "'bf16'"]),
    ("lora: 16\n", None, ["lora", "16", "expected a mapping"]),
    ("- a\n- b\n", None, ["mapping of sections"]),
    ("lora: [\n", None, ["not valid YAML"]),
    ("", None, ["is empty", "train"]),
    ("# only a comment\n", None, ["is empty"]),
    ("lora:\n  r: 8\n  r: 4\n", None, ["'r'", "twice", "lines 2 and 3"]),
    ("lora: {r: 8}\nlora: {r: 4}\n", None, ["'lora'", "twice"]),
    ("lora:\n  r: 100000000000\n", None, ["lora.r", "100000000000", "from 1 to 8,192"]),
    ("train:\n  threads: 100000000000\n", None, ["train.threads", "from 1 to 4,096"]),
    ("train:\n  max_steps: 1000000000000000000000000000000\n", None, ["train.max_steps", "1,000,000,000"]),
    ("optim:\n  warmup_steps: 1000000000000000000000\n", None, ["optim.warmup_steps", "1,000,000,000"]),
    ("train:\n  max_bad_steps: 0\n", None, ["train.max_bad_steps", "from 1"]),
])
def test_errors_name_key_value_and_allowed(tmp_path: Path, text: str, override: str | None, needles: list[str]):
    with pytest.raises(UsageError) as e:
        load_recipe(write(tmp_path, text), [override] if override else [])
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_missing_file(tmp_path: Path):
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_python_construction_is_checked_too():
    with pytest.raises(UsageError, match=r"quant\.quant_type: 'nf5'"):
        QuantConfig(quant_type="nf5")
    assert TrainConfig(threads=2).threads == 2
    assert LoraConfig(alpha=16).alpha == 16.0 and isinstance(LoraConfig(alpha=16).alpha, float)


def test_save_recipe_round_trip_and_atomic(tmp_path: Path):
    cfg = load_recipe(RECIPES[0], ["train.max_steps=3"])
    out = tmp_path / "run" / "recipe.yaml"
    save_recipe(cfg, out)
    assert load_recipe(out) == cfg
    assert yaml.safe_load(out.read_text())["train"]["max_steps"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["recipe.yaml"]  # no temp file left
