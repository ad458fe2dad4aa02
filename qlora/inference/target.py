"""Resolve what `qlora eval` / `qlora generate` should load, and load it.

A TARGET is one of
- a run folder (has `recipe.yaml`; its `adapter/` is used unless `--base`; a run still training, or
  stopped before its final adapter, uses its newest verified checkpoint's adapter and says so),
- a recipe file (`*.yaml`),
- a model: a built-in name (`smollm2-135m`), a local HF folder, or a 4-bit export.
An adapter whose run folder holds a `base/` (saved when `lora.init` changed the 4-bit base, as
PiSSA does) is applied to that base, which loads as stored.
The recipe (or the defaults, for a bare model) supplies the quantisation and data settings;
`section.key=value` overrides apply on top, as for `qlora train`.

`--adapter [NAME=]DIR` may repeat: every adapter is loaded onto the one base
(`qlora.adapters.multi.AdapterSet`), named NAME or its folder's name, and the first is active.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.config import RecipeConfig
from qlora.recipe import apply_override, load_recipe, recipe_from_dict
from qlora.errors import UsageError
from qlora.adapters.spec import read_spec
from qlora.run_dir import ADAPTER, LOCK, RunDir, saved_base

if TYPE_CHECKING:
    import torch.nn as nn

    from qlora.adapters.multi import AdapterSet


def add_target_arguments(p) -> None:
    """The TARGET, overrides, --adapter and --base arguments shared by `eval` and `generate`."""
    p.add_argument("target", help="run folder, recipe .yaml, or model name / folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. quant.enabled=false")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="PEFT adapter folder to apply; repeat to load several onto one base (NAME defaults to the folder's name)")
    p.add_argument("--base", action="store_true", help="use the base model without any adapter")


@dataclass
class Target:
    cfg: RecipeConfig
    adapters: dict[str, Path]
    """Adapter folders by name, in command-line order (the first is active after loading)."""


def parse_adapters(items: list[str]) -> dict[str, Path]:
    """`[NAME=]DIR` items -> {name: folder}; NAME defaults to the folder's name and must be unique."""
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or "/" in name or not name:
            name, folder = Path(item).name, item
        if name in adapters:
            raise UsageError(f"--adapter {item!r}: the name {name!r} is taken; give each adapter a NAME= of its own")
        if not Path(folder).is_dir():
            raise UsageError(f"--adapter {item!r}: {folder!r} is not a folder")
        adapters[name] = Path(folder)
    return adapters


def resolve_target(target: str, overrides: list[str], adapters: list[str] | None = None,
                   base_only: bool = False) -> Target:
    path, run = Path(target), RunDir(target)
    run_adapter = None
    if path.is_dir() and run.recipe.is_file():
        cfg = load_recipe(run.recipe, overrides)
        run_adapter = None if base_only or adapters else run_adapter_of(run)
    elif path.suffix in (".yaml", ".yml"):
        cfg = load_recipe(path, overrides)
    else:
        data: dict = {"model": {"name_or_path": target}}
        for item in overrides:
            apply_override(data, item)
        cfg = recipe_from_dict(data)
    if base_only:
        chosen: dict[str, Path] = {}
    elif adapters:
        chosen = parse_adapters(adapters)
    else:
        chosen = {"adapter": run_adapter} if run_adapter else {}
    _use_saved_base(cfg, chosen)
    return Target(cfg, chosen)


def run_adapter_of(run: RunDir) -> Path | None:
    """A run folder's final adapter; for a live or stopped run without one yet, its newest verified
    checkpoint's adapter (said on stderr); a UsageError when it has neither. None for a model
    folder that holds a recipe (a merged model: config.json beside recipe.yaml)."""
    from qlora.checkpoint_files import latest_checkpoint
    from qlora.lockfile import live_owner

    if run.adapter.is_dir():
        return run.adapter
    if (run.root / "config.json").is_file():
        return None
    state = "is still training" if live_owner(run.root / LOCK) else "stopped before writing its final adapter"
    checkpoint = latest_checkpoint(run.root)
    if checkpoint is None:
        raise UsageError(f"run {str(run.root)!r} {state} and has no complete checkpoint yet, so it has no adapter "
                         "to load; pass --base to use the base model alone")
    print(f"note: run {str(run.root)!r} {state}; using the adapter of its newest verified checkpoint, "
          f"{checkpoint.name}", file=sys.stderr)
    return checkpoint / ADAPTER


def _use_saved_base(cfg: RecipeConfig, adapters: dict[str, Path]) -> None:
    """Point the recipe at the adapters' saved 4-bit base when `lora.init` changed it (all must agree)."""
    bases = {saved_base(folder) for folder in adapters.values()}
    if len(bases) > 1:
        names = sorted(str(b) if b else cfg.model.name_or_path for b in bases)
        raise UsageError(f"--adapter: these adapters were trained on different 4-bit bases ({names}); "
                         "load them in separate commands")
    if bases and None not in bases:
        cfg.model.name_or_path = str(bases.pop())


class OneAdapter:
    """One adapter loaded into the model's own adapter layers (DoRA, which `AdapterSet` cannot
    hot-swap), with `AdapterSet`'s `adapters` / `active` / `set_adapter` (on or off)."""

    def __init__(self, model: nn.Module, dtype: str) -> None:
        self.model, self.dtype = model, dtype
        self.adapters: dict[str, Path] = {}
        self.active: str | None = None

    def load_adapter(self, path: str | Path, name: str) -> None:
        from qlora.adapters.peft_format import load_adapter

        load_adapter(self.model, path, dtype=self.dtype)
        self.adapters[name] = Path(path)

    def set_adapter(self, name: str | None) -> None:
        from qlora.nn.adapter import adapter_layers

        if name is not None and name not in self.adapters:
            raise UsageError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        for layer in adapter_layers(self.model).values():
            layer.disabled = name is None
        self.active = name


def load_for_inference(target: Target, device) -> tuple[nn.Module, object, AdapterSet]:
    """(model in eval mode, tokenizer, its adapters): every adapter loaded, the first active."""
    from qlora.adapters.multi import AdapterSet
    from qlora.adapters.peft_format import read_adapter_weights
    from qlora.hf.chat_template import saved_chat_template, set_chat_template
    from qlora.hf.folder import load_tokenizer
    from qlora.hf.load import load_base_model

    cfg = target.cfg
    for folder in target.adapters.values():  # config and tensors checked before the base loads
        read_adapter_weights(folder)
    model = load_base_model(cfg, device)
    dora = [name for name, folder in target.adapters.items() if read_spec(folder)[0].use_dora]
    if dora and len(target.adapters) > 1:
        raise UsageError(f"--adapter: {dora} are DoRA adapters, which load one at a time (several adapters "
                         "on one base are LoRA only); give one --adapter")
    adapters = OneAdapter(model, cfg.lora.dtype) if dora else AdapterSet(model, cfg.lora.dtype)
    for name, folder in target.adapters.items():
        adapters.load_adapter(folder, name)
    adapters.set_adapter(next(iter(target.adapters), None))
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    saved = [t for folder in target.adapters.values() if (t := saved_chat_template(folder))]
    if saved:  # the template the adapter was trained with
        tokenizer.chat_template = saved[0]
    else:
        set_chat_template(tokenizer, cfg.data.chat_template)
    return model.eval(), tokenizer, adapters
