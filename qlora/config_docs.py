"""The reference of recipe keys, generated from the config dataclasses (what `qlora config` prints).

Each field of a section in `qlora.config` is documented by the string literal written right under
it (an attribute docstring, as in litgpt's `args.py`). Python keeps no such string at run time, so
`field_docs` reads them back from the class source with `ast`: the source is the single place a key
and its meaning are written, and the printed reference cannot drift from it.
`tests/test_config_docs.py` fails when a field has no docstring.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import yaml

from qlora.config import SECTIONS, RecipeConfig
from qlora.recipe import recipe_to_dict


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} of a dataclass, from its source."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for field, after in zip(node.body, node.body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field.target.id] = inspect.cleandoc(after.value.value)
    return docs


def reference(cfg: RecipeConfig | None = None, width: int = 100) -> str:
    """Every recipe key with its value (the recipe's, else the default), the default when the recipe
    changes it, and its docstring, section by section."""
    defaults = recipe_to_dict(RecipeConfig())
    values = recipe_to_dict(cfg) if cfg is not None else defaults
    lines = []
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines.append(f"{section}:")
        for key, value in values[section].items():
            changed = f"   # default: {_yaml(defaults[section][key])}" if value != defaults[section][key] else ""
            lines.append(f"  {key}: {_yaml(value)}{changed}")
            for paragraph in docs.get(key, "(undocumented)").split("\n\n"):
                lines += textwrap.wrap(" ".join(paragraph.split()), width, initial_indent="      ",
                                       subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _yaml(value) -> str:
    """A value as it would be written in a recipe (flow style: `[q_proj, v_proj]`, `null`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
