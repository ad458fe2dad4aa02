"""Hugging Face's / TRL's names for recipe keys and values get a did-you-mean naming ours."""

from __future__ import annotations

import dataclasses

import pytest

from qlora.config import SECTIONS
from qlora.errors import UsageError
from qlora.hf_names import KEYS, VALUES
from qlora.recipe import recipe_from_dict


@pytest.mark.parametrize("section, key, ours", [
    ("optim", "learning_rate", "optim.lr"), ("lora", "rank", "lora.r"), ("lora", "lora_alpha", "lora.alpha"),
    ("train", "per_device_train_batch_size", "train.micro_batch_size"), ("train", "learning_rate", "optim.lr"),
    ("data", "max_seq_length", "data.max_length"),
])
def test_a_hugging_face_key_names_ours(section, key, ours):
    with pytest.raises(UsageError, match=rf"unknown recipe key '{section}.{key}' \(did you mean {ours}\? "
                                         rf"'{key}' is the Hugging Face name\)"):
        recipe_from_dict({section: {key: 1}})


@pytest.mark.parametrize("key, value, ours", [
    ("name", "adamw_torch", "adamw"), ("name", "adamw_bnb_8bit", "adamw_8bit"),
    ("scheduler", "cosine_with_warmup", "cosine"), ("scheduler", "constant_with_warmup", "constant"),
])
def test_a_hugging_face_value_names_ours(key, value, ours):
    with pytest.raises(UsageError, match=rf"optim.{key}: '{value}' is not allowed; .*\(did you mean '{ours}'\? "
                                         rf"'{value}' is the Hugging Face name"):
        recipe_from_dict({"optim": {key: value}})


def test_every_hint_points_at_a_real_key_and_value():
    fields = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(KEYS.values()) <= fields
    for (section, key), mapping in VALUES.items():
        for ours, _ in mapping.values():
            recipe_from_dict({section: {key: ours}})  # each suggestion is accepted
