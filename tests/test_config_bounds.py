"""Every integer recipe key has its lower bound in the recipe check: walked at 0 and -1, each is
refused naming the key, or (0 only) is one whose 0 has a documented meaning, and a tiny run with
all of those at 0 at once trains to the end (train.log_every=0 and train.loss_chunk_size=0 used
to crash mid-run, after the model loaded and the run folder was written)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from qlora.config import SECTIONS
from qlora.errors import UsageError
from qlora.recipe import recipe_from_dict

# Keys whose 0 means something (the field docstrings say what).
ZERO_MEANS = {
    "lora.tinit": "no initial warm phase", "lora.tfinal": "no final fine-tuning phase",
    "optim.warmup_steps": "no warmup", "train.eval_every": "only before and after training",
    "train.save_every": "only the final adapter", "train.loss_chunk_size": "no chunking",
    "train.eval_samples": "no sample answers", "train.seed": "seed 0", "data.seed": "seed 0",
    "data.eval_size": "hold out no rows by count (eval_fraction applies)",
}


def int_keys() -> list[str]:
    keys = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if int in (hints[f.name], *typing.get_args(hints[f.name])) and hints[f.name] is not bool:
                keys.append(f"{section}.{f.name}")
    return keys


def test_the_walk_sees_the_integer_keys():
    keys = int_keys()
    assert {"train.log_every", "train.loss_chunk_size", "lora.r", "data.max_length", "quant.blocksize"} <= set(keys)
    assert set(ZERO_MEANS) <= set(keys)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("key", int_keys())
def test_every_integer_key_has_a_lower_bound(key, value):
    section, name = key.split(".")
    try:
        recipe_from_dict({section: {name: value}})
    except UsageError as err:
        assert str(err).startswith(f"{key}: {value!r} is not allowed"), str(err)
        return
    assert value == 0 and key in ZERO_MEANS, f"{key}={value} is accepted"


def test_a_run_with_every_zero_that_means_something(tmp_path):
    from test_train import TINY, home, run_cli  # noqa: F401

    zeros = [f"{key}=0" for key in ZERO_MEANS if not key.startswith("lora.")]  # AdaLoRA-only keys
    result = run_cli("train", str(TINY), f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "--samples", "0",
                     *zeros, env={"QLORA_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
