"""Reading and writing recipes: YAML <-> `RecipeConfig` (the sections are in `qlora.config`).

`load_recipe(path, overrides)` reads a recipe with `yaml.safe_load`, applies command-line overrides
written as `section.field=value` (the value is parsed as YAML, so `train.max_steps=10` is an int and
`lora.targets=[q_proj,v_proj]` a list), and builds a validated `RecipeConfig`. Every mistake is a
`UsageError` naming the full key (`lora.rr`), the value and what is allowed (the known keys with a
"did you mean" suggestion). An empty file and a key written twice are mistakes too (YAML itself
would run the default job, or silently keep the last value). `save_recipe` writes the resolved
recipe atomically.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from qlora.config import SECTIONS, RecipeConfig
from qlora.errors import UsageError
from qlora.hf_names import key_hint
from qlora.typecheck import coerce


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice, naming the key and line."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UsageError(f"recipe key {key!r} is written twice (lines {seen[key]} and {line}); "
                                 "keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _unknown_key(path: str, key: str, allowed: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, allowed, n=1)
    where = f"{path}.{key}" if path else key
    hint = key_hint(path, key) if path else None
    hint = hint or (f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else "")
    return UsageError(f"unknown recipe key {where!r}{hint}; allowed keys: {', '.join(allowed)}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def recipe_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """Build and validate a RecipeConfig from a nested mapping (missing keys take defaults)."""
    if not isinstance(data, dict):
        raise UsageError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name, body in data.items():
        if name not in SECTIONS:
            raise _unknown_key("", str(name), list(SECTIONS))
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise UsageError(f"{name}: {body!r} is not allowed; expected a mapping of "
                             f"{', '.join(_field_names(SECTIONS[name]))}")
        for key in body:
            if key not in _field_names(SECTIONS[name]):
                raise _unknown_key(name, str(key), _field_names(SECTIONS[name]))
        sections[name] = SECTIONS[name](**body)
    return RecipeConfig(**sections)


def _field_type(section: str, key: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[key]


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.field=value` override to a nested recipe mapping, in place.

    The value is parsed with yaml.safe_load (`10` -> int, `[a,b]` -> list, `null` -> None). When
    the field takes a string and YAML read something else (`output.dir=2024`), the raw text is kept.
    """
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UsageError(f"override {override!r} is not allowed; expected section.field=value, "
                         f"e.g. train.max_steps=10 (sections: {', '.join(SECTIONS)})")
    section, name = parts
    if section not in SECTIONS:
        raise _unknown_key("", section, list(SECTIONS))
    if name not in _field_names(SECTIONS[section]):
        raise _unknown_key(section, name, _field_names(SECTIONS[section]))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UsageError(f"override {key}: cannot parse {raw!r} as a YAML value ({e})") from None
    takes_str, _ = coerce("x", _field_type(section, name))
    if takes_str and not isinstance(value, (str, list, dict)) and value is not None:
        value = raw
    body = data.setdefault(section, {})
    if body is None:
        body = data[section] = {}
    if not isinstance(body, dict):
        raise UsageError(f"{section}: {body!r} is not allowed; expected a mapping")
    body[name] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a YAML recipe, apply `section.field=value` overrides, and validate it."""
    data = read_recipe(path)
    for override in overrides or []:
        apply_override(data, override)
    return recipe_from_dict(data)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of sections a YAML recipe file holds (checked to be one, not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None
    except UsageError as e:
        raise UsageError(f"recipe file {str(path)!r}: {e}") from None
    if data is None:
        raise UsageError(f"recipe file {str(path)!r} is empty; write at least one section "
                         f"({', '.join(SECTIONS)}), e.g. `train: {{max_steps: 10}}` (see recipes/)")
    if not isinstance(data, dict):
        raise UsageError(f"recipe file {str(path)!r} must hold a mapping of sections "
                         f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def recipe_to_dict(cfg: RecipeConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the resolved recipe (tuples become lists, for YAML / JSON)."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v
    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
            for name in SECTIONS}


def save_recipe(cfg: RecipeConfig, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML atomically (temp file in the same folder, then rename)."""
    from qlora.io import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False))
