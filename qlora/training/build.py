"""What a training run builds before its first step: the run folder checked, the model with adapters.

`prepare_run_dir` refuses to start on a folder that holds something else than a qlora run, or an
old run without --overwrite / --resume; the old run is deleted only later, once loading succeeded
(a failed start keeps it). `build_model` is the recipe's base model (`qlora.hf.load`) with LoRA
attached by the recipe's `LoraSpec`, prepared for training (checkpointing, no KV cache).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from qlora import runtime
from qlora.adapters.init import AdapterInit
from qlora.adapters.surgery import apply_lora, prepare_for_training
from qlora.config import RecipeConfig
from qlora.errors import UsageError
from qlora.hf.load import load_base_model
from qlora.outputs import written_kind
from qlora.run_dir import LOCK, MARKERS, RunDir
from qlora.training.checkpoint import latest_checkpoint
from qlora.adapters.reference import start_from_adapter


def build_model(cfg: RecipeConfig, rt: runtime.Runtime, saved_base: Path | None = None) -> nn.Module:
    """The 4-bit (or 16-bit with quant.enabled=false) base with LoRA adapters, ready to train.

    `lora.init` loftq / pissa initialise each target layer while it loads (`AdapterInit`);
    `saved_base` (a resumed run's `base/`) is loaded instead, as it is stored, with no init.
    """
    spec = cfg.lora.spec()
    if spec.init != "default" and not cfg.quant.enabled:  # checked here: eval of a merged run is 16-bit
        raise UsageError(f"lora.init: {spec.init!r} needs quant.enabled=true (it initialises the adapter from "
                         "each weight as it is quantised); expected 'default' for 16-bit LoRA")
    if spec.changes_base and rt.distributed and cfg.train.distributed == "fsdp":  # the base is exported from unsharded layers
        raise UsageError(f"lora.init: {spec.init!r} changes the 4-bit base, which is not saved from FSDP "
                         "shards yet; expected 'default' or 'loftq' (loftq_iters=1) with train.distributed 'fsdp'")
    init = AdapterInit(spec, cfg.quant.format(cfg.model.dtype)) if spec.init != "default" and saved_base is None else None
    model = load_base_model(cfg, rt.device, name_or_path=saved_base, init_linear=init)
    apply_lora(model, spec)
    if init is not None:
        init.apply_factors(model)
    if cfg.model.adapter:  # continue from an adapter (a preference run's reference: qlora.adapters.reference)
        start_from_adapter(model, cfg.model.adapter, cfg.model.name_or_path, cfg.lora.use_adalora)
    return prepare_for_training(model, cfg.train.gradient_checkpointing)


def prepare_run_dir(cfg: RecipeConfig, resume: bool) -> tuple[Path, bool, Path | None]:
    """Check the output folder (its lock already held); returns (folder, whether an old run there
    must be cleared first, the checkpoint to resume from)."""
    run_dir = Path(cfg.output.dir)
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UsageError(f"--resume: {run_dir} has no complete checkpoint to resume from; "
                             "--overwrite (instead of --resume) starts the run afresh there")
        return run_dir, False, checkpoint
    if not (run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir())):
        return run_dir, False, None
    if not cfg.output.overwrite:
        raise UsageError(f"output.dir {str(run_dir)!r} already exists; pass --overwrite "
                         "(or output.overwrite=true), --resume, or choose another output.dir")
    if written_kind(run_dir) is not None:  # a merged model holds its run's recipe.yaml
        raise UsageError(f"output.dir {str(run_dir)!r} holds a {written_kind(run_dir)} model, not a run; "
                         "refusing to delete it with --overwrite")
    if not RunDir(run_dir).is_run():
        raise UsageError(f"output.dir {str(run_dir)!r} is not empty and holds no qlora run "
                         f"({' / '.join(MARKERS)}); refusing to delete it with --overwrite")
    return run_dir, True, None
