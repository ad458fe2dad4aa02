"""Checking values against dataclass annotations, for recipe sections.

`Section` is the base of every recipe section: its `_check_types` compares each field with its
annotation (int, float, bool, str, Literal choices, list[...], tuple[...], dict[...], Optional / Union),
converts where the conversion is lossless (ints for floats, lists for tuples, numeric strings for
floats because YAML 1.1 reads `1e-4` as a string), and otherwise raises a `UsageError` naming
`section.field`, the value, the expected type and, for near-miss strings, the closest choice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, ClassVar, Literal, Union

from qlora.errors import UsageError
from qlora.hf_names import value_hint

def type_name(tp: Any) -> str:
    """Readable name of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin is Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else tp.__name__


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to `tp`). Ints are accepted for floats; lists for tuples."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            ok, converted = coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp) and isinstance(value, str), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        pairs = [coerce(v, item) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, value
        pairs = [(coerce(k, key_type), coerce(v, value_type)) for k, v in value.items()]
        return all(k[0] and v[0] for k, v in pairs), {k[1]: v[1] for k, v in pairs}
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            return False, value
        pairs = [coerce(v, t) for v, t in zip(value, items)]
        return all(ok for ok, _ in pairs), tuple(v for _, v in pairs)
    if tp is type(None):
        return value is None, value
    if tp is float:  # YAML 1.1 reads `1e-4` as a str (it wants `1.0e-4`): accept numeric strings
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False, value
        try:
            number = float(value)
        except ValueError:
            return False, value
        return math.isfinite(number), number
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def suggest(value: Any, tp: Any) -> str:
    """` (did you mean 'x'?)` for a string close to one of a Literal's choices, else ``."""
    choices = [c for a in (typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,))
               if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


class Section:
    """Mixin for recipe sections: type-checks every field against its annotation in __post_init__."""

    section: ClassVar[str]

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, converted = coerce(value, hints[f.name])
            if not ok:
                hint = value_hint(self.section, f.name, value) or suggest(value, hints[f.name])
                raise UsageError(f"{self.section}.{f.name}: {value!r} is not allowed; expected "
                                 f"{type_name(hints[f.name])}{hint}")
            setattr(self, f.name, converted)

    def _require_range(self, name: str, low: int, high: int, why: str = "") -> None:
        """Require an int field (or null) in [low, high]; `why` explains an upper limit in the message."""
        value = getattr(self, name)
        self._require(value is None or low <= value <= high, name,
                      f"expected an int from {low} to {high:,}{f' ({why})' if why else ''}")

    def _require(self, ok: bool, name: str, allowed: str) -> None:
        """Raise a UsageError for field `name` unless `ok`; `allowed` says what would be valid."""
        if not ok:
            raise UsageError(f"{self.section}.{name}: {getattr(self, name)!r} is not allowed; {allowed}")
