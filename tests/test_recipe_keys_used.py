"""Every recipe key is read by the code that runs the recipe (issue: `model.attn_implementation` was
validated and never passed on).

A static check over the package (ast): each field of each recipe section must be read as an
attribute (`cfg.train.seed`, `tc.seed`, `lc.r`, ...) somewhere outside the config and recipe
modules themselves, or be listed in INFORMATIONAL with the reason it is not read. Generic names
(`seed`, `dir`, `name`) match any attribute so named: the check is a floor (it found the unused
`attn_implementation`), the behaviour of each key is covered by the tests of its module.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from qlora.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1] / "qlora"
DEFINING = {ROOT / "config.py", ROOT / "config_data.py", ROOT / "recipe.py", ROOT / "typecheck.py"}
INFORMATIONAL: dict[str, str] = {}  # "section.key": why nothing reads it


def attributes_read() -> set[str]:
    names: set[str] = set()
    for path in ROOT.rglob("*.py"):
        if path in DEFINING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


def test_every_recipe_key_is_read_somewhere():
    read = attributes_read()
    unread = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f.name not in read and f"{name}.{f.name}" not in INFORMATIONAL]
    assert unread == []


def test_the_check_sees_an_unread_key():
    assert "definitely_not_a_real_attribute_name" not in attributes_read()
    assert {"attn_implementation", "max_bad_steps", "loss_chunk_size"} <= attributes_read()
