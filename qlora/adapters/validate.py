"""The checks of a user's `adapter_config.json`, field by field, before anything uses it.

An adapter folder is a user file: a wrong value used to surface as a ZeroDivisionError in the
scaling (`r: 0`), a "'list' object has no attribute 'get'" (the config a JSON list), a torch
error in AdaLoRA's `rank_pattern` ("new(): invalid data type 'str'"), or worse, as nothing: a wrong
`r` changed the scaling alpha / r of every command that read it. `check_config` refuses each of
these with one line naming the file, the field, the value and what is allowed. What the config
must agree with in the tensors (ranks, modules) is `qlora.adapters.fit`'s part.

    r, init_r        int >= 1 (AdaLoRA reads its rank from init_r; PEFT keeps r at 8)
    lora_alpha       a finite real number
    lora_dropout     a real number in [0, 1)
    use_rslora, use_dora   true / false
    target_modules   "all-linear", a regex string, or a non-empty list of module names
    rank_pattern     AdaLoRA: null or {"<module>.lora_E": [bool] * init_r} (all false: a layer
                     the budget emptied, rank 0, as PEFT reads it)
"""

from __future__ import annotations

import math

from qlora.errors import UsageError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config, source: str) -> None:
    """A UsageError naming the first field of a PEFT LoRA / AdaLoRA config qlora cannot use."""
    if not isinstance(config, dict):
        raise UsageError(f"{source}: expected a JSON object (PEFT's adapter config); got a JSON {type(config).__name__}")
    adalora = config.get("peft_type") == "ADALORA"
    rank_field = "init_r" if adalora else "r"
    for field in (rank_field, "lora_alpha", "target_modules"):
        if field not in config:
            raise UsageError(f"{source}: missing field {field!r}")
    _field(source, rank_field, config[rank_field], _is_int(config[rank_field]) and config[rank_field] >= 1,
           "an int >= 1")
    _field(source, "lora_alpha", config["lora_alpha"], _is_real(config["lora_alpha"]), "a finite number")
    dropout = config.get("lora_dropout", 0.0)
    _field(source, "lora_dropout", dropout, _is_real(dropout) and 0 <= dropout < 1, "a number in [0, 1)")
    for flag in ("use_rslora", "use_dora"):
        _field(source, flag, config.get(flag, False), isinstance(config.get(flag, False), bool), "true or false")
    targets = config["target_modules"]
    good = (isinstance(targets, str) and targets != "") or (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
    _field(source, "target_modules", targets, good, "'all-linear', a regex string or a non-empty list of module names")
    if adalora:
        _check_rank_pattern(config.get("rank_pattern"), config["init_r"], source)


def _field(source: str, field: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise UsageError(f"{source}: {field}={value!r}; expected {allowed}")


def _check_rank_pattern(pattern, init_r: int, source: str) -> None:
    """AdaLoRA's rank_pattern: null, or per `<module>.lora_E` a list of init_r bools."""
    if pattern is None or pattern == {}:
        return
    allowed = f'null or {{"<module>.lora_E": [true/false] * init_r ({init_r})}}'
    _field(source, "rank_pattern", pattern, isinstance(pattern, dict), allowed)
    for key, kept in pattern.items():
        ok = (key.endswith(".lora_E") and isinstance(kept, list) and len(kept) == init_r
              and all(isinstance(k, bool) for k in kept))
        _field(source, f"rank_pattern[{key!r}]", kept, ok, f"a list of init_r = {init_r} true/false values")
