"""`qlora config`: the reference of recipe keys, generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qlora.cli import main
from qlora.config import SECTIONS
from qlora.config_docs import field_docs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_recipe_key_has_a_docstring(section):
    cls = SECTIONS[section]
    docs = field_docs(cls)
    missing = [f"{section}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert missing == [], "document each key with a string literal right under its field"


def test_field_docs_reads_attribute_docstrings_only():
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """The a."""
        b: int = 2
        c: str = "x"
        """Multi-line
        doc of c."""

    assert field_docs(Example) == {"a": "The a.", "c": "Multi-line\ndoc of c."}


def test_config_prints_every_key_with_its_default(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        assert f"\n{section}:\n" in f"\n{out}"
        for f in dataclasses.fields(cls):
            assert f"\n  {f.name}: " in out
    assert "  r: 16\n      Rank of the update B @ A." in out and "# default" not in out


def test_config_of_a_recipe_shows_its_values_and_the_defaults(capsys):
    assert main(["config", str(RECIPES / "tiny_smoke.yaml"), "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "  name_or_path: tiny-llama   # default: smollm2-135m" in out
    assert "  r: 4   # default: 16" in out


def test_config_with_a_bad_override_exits_2(capsys):
    assert main(["config", str(RECIPES / "tiny_smoke.yaml"), "lora.rank=4"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert main(["config", "lora.r=4"]) == 2
