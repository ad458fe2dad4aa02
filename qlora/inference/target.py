"""Resolve what `qlora eval` / `qlora generate` should load, and load it.

A TARGET is one of
- a run folder (has `recipe.yaml`; its `adapter/` is used unless `--base`),
- a recipe file (`*.yaml`),
- a model: a built-in name (`smollm2-135m`), a local HF folder, or a 4-bit export.
The recipe (or the defaults, for a bare model) supplies the quantisation and data settings;
`section.key=value` overrides apply on top, as for `qlora train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.config import RecipeConfig
from qlora.recipe import apply_override, load_recipe, recipe_from_dict
from qlora.errors import UsageError
from qlora.run_dir import RunDir

if TYPE_CHECKING:
    import torch.nn as nn


def add_target_arguments(p) -> None:
    """The TARGET, overrides, --adapter and --base arguments shared by `eval` and `generate`."""
    p.add_argument("target", help="run folder, recipe .yaml, or model name / folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. quant.enabled=false")
    p.add_argument("--adapter", help="PEFT adapter folder to apply")
    p.add_argument("--base", action="store_true", help="use the base model without any adapter")


@dataclass
class Target:
    cfg: RecipeConfig
    adapter: Path | None


def resolve_target(target: str, overrides: list[str], adapter: str | None = None, base_only: bool = False) -> Target:
    path, run = Path(target), RunDir(target)
    run_adapter = None
    if path.is_dir() and run.recipe.is_file():
        cfg = load_recipe(run.recipe, overrides)
        run_adapter = run.adapter if run.adapter.is_dir() else None
    elif path.suffix in (".yaml", ".yml"):
        cfg = load_recipe(path, overrides)
    else:
        data: dict = {"model": {"name_or_path": target}}
        for item in overrides:
            apply_override(data, item)
        cfg = recipe_from_dict(data)
    chosen = None if base_only else Path(adapter) if adapter else run_adapter
    if chosen is not None and not chosen.is_dir():
        raise UsageError(f"--adapter {str(chosen)!r} is not a folder")
    return Target(cfg, chosen)


def load_for_inference(target: Target, device) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer), with the adapter applied when there is one."""
    from qlora.adapters.peft_format import load_adapter
    from qlora.hf.folder import load_tokenizer
    from qlora.hf.load import load_base_model

    cfg = target.cfg
    model = load_base_model(cfg, device)
    if target.adapter is not None:
        load_adapter(model, target.adapter, dtype=cfg.lora.dtype)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    return model.eval(), tokenizer
