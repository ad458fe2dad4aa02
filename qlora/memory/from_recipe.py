"""The planner's settings for a training recipe: the plan of exactly what `qlora train` would run.

`qlora memory RECIPE` plans from these: the recipe's model shape (its folder's config.json, or a
built-in shape when the folder is not on this machine yet), LoRA rank and targets, quantisation,
micro-batch and sequence length, gradient checkpointing, optimiser, attention and the chunked or
full loss, all as `qlora train` would use them; for a mixture-of-experts model also the expert LoRA
of `lora.target_parameters` (`qlora.memory.moe`).
"""

from __future__ import annotations

import json
import os

from qlora.errors import UsageError
from qlora.memory.configs import BUILTIN_MODELS, LINEAR_NAMES, ModelShape, builtin_shape, did_you_mean, shape_from_config
from qlora.memory.plan import PlanSettings


def recipe_shape(recipe) -> tuple[ModelShape, str]:
    """The shape of a recipe's `model.name_or_path` and a note on where it came from.

    Tried in order: a local folder with config.json; a built-in shape of that name (`smollm2-135m`,
    or a folder named after its model such as `models/Meta-Llama-3-8B`, which need not exist yet);
    the built-in test models `tiny-llama` and `tiny-mixtral`.
    """
    name = recipe.model.name_or_path
    config = os.path.join(os.path.expanduser(name), "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return shape_from_config(json.load(f), name=name), f"shape from {config}"
    shape = builtin_shape(name)
    if shape is not None:
        where = "" if shape.name == name else f" ({name} is not on this machine)"
        return shape, f"built-in shape {shape.name}{where}"
    if name in ("tiny-llama", "tiny-mixtral"):
        from qlora.hf.embedded import TINY_LLAMA, TINY_MIXTRAL

        config = TINY_LLAMA if name == "tiny-llama" else TINY_MIXTRAL
        return shape_from_config(config, name=name), "the built-in test model"
    raise UsageError(f"model.name_or_path {name!r}: no local folder with config.json and no built-in shape of that "
                     f"name{did_you_mean(name)}; pass --model with one of {', '.join(BUILTIN_MODELS)} or a "
                     "config.json")


def settings_from_recipe(recipe, device: str = "cuda", **changes) -> PlanSettings:
    """`PlanSettings` for a training recipe (a `qlora.config.RecipeConfig`), as our trainer runs it.

    The sequence length is the recipe's `data.max_length` (the longest a batch can be) and every
    token is counted as a loss target: the plan is for the worst batch the recipe allows. The
    trainer's loss is chunked (`qlora.nn.loss.CausalLMLoss`) unless `train.loss_chunk_size` is 0.
    LoRA targets given as names or a `re:` pattern are matched against each decoder layer's linear
    layer names. `changes` override single fields (e.g. `seq_len=` for a batch actually seen).
    """
    if not recipe.quant.enabled:
        raise UsageError("quant.enabled is false: the planner models a 4-bit base (QLoRA) only")
    chunk = recipe.train.loss_chunk_size
    experts = recipe.lora.target_parameters
    fields = dict(
        lora_r=recipe.lora.r, lora_targets=_recipe_targets(recipe.lora.targets), lora_dropout=recipe.lora.dropout,
        lora_target_parameters=(experts,) if isinstance(experts, str) else tuple(experts),
        lora_dtype=recipe.lora.dtype, adalora=recipe.lora.use_adalora, seq_len=recipe.data.max_length, micro_batch=recipe.train.micro_batch_size,
        grad_checkpointing=recipe.train.gradient_checkpointing, optimizer=recipe.optim.name,
        offload_activations=recipe.train.offload_activations,
        compute_dtype=recipe.model.dtype, quant_type=recipe.quant.quant_type, blocksize=recipe.quant.blocksize,
        double_quant=recipe.quant.double_quant,
        attention="eager" if recipe.model.attn_implementation == "eager" else "sdpa",
        packed=recipe.data.packing and not recipe.model.attn_implementation.startswith("flash"),
        loss="chunked" if chunk else "full", loss_chunk=chunk or 1024, device=device)
    return PlanSettings(**{**fields, **changes})


def _recipe_targets(targets) -> tuple[str, ...]:
    """A recipe's `lora.targets` as the planner's linear-layer names."""
    import re

    if targets == "all-linear":
        return LINEAR_NAMES
    if isinstance(targets, str) and targets.startswith("re:"):
        pattern = re.compile(targets[3:])
        where = {n: "self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp" for n in LINEAR_NAMES}
        names = tuple(n for n in LINEAR_NAMES if pattern.fullmatch(f"model.layers.0.{where[n]}.{n}"))
    else:
        leaves = {t.rpartition(".")[2] for t in targets}
        unknown = sorted(leaves - set(LINEAR_NAMES))
        if unknown:
            raise UsageError(f"lora.targets {list(targets)!r}: the planner knows only {', '.join(LINEAR_NAMES)}, "
                             f"not {', '.join(unknown)}")
        names = tuple(n for n in LINEAR_NAMES if n in leaves)
    if not names:
        raise UsageError(f"lora.targets {targets!r} matches none of {', '.join(LINEAR_NAMES)}")
    return names
