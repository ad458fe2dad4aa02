"""Data parallelism: DDP (every process holds the whole model) or FSDP2 (parameters sharded).

DDP wraps the loss module; gradients of the LoRA parameters are averaged across processes, and
micro-batches before the last of an optimiser step skip that all-reduce (`no_sync`).

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every parameter across processes, the packed
4-bit weights included: each decoder layer is one unit (all-gathered for its forward and
backward, then freed), the loss module the root (embeddings, norm, lm_head). FSDP gathers a unit's
parameters into one buffer, so they must share one dtype: the packed weights are stored as bf16
(`quant.quant_storage: bf16`, the same bytes viewed as bf16) next to the bf16 norms and adapters.
Parameters become DTensors, which bitsandbytes optimisers cannot update; FSDP runs take
`optim.name: adamw` (its fp32 states are sharded too). On CPU the same code runs over gloo.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


def parallelize(loss_fn: nn.Module, model: nn.Module, strategy: str) -> nn.Module:
    """Wrap `loss_fn` (which owns `model`) for DDP or FSDP (the recipe checks FSDP's dtype and optimiser)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(loss_fn)
        return loss_fn
    return nn.parallel.DistributedDataParallel(loss_fn, broadcast_buffers=False)


def gradient_sync(loss_fn: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce for micro-batches before the last one of a step."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(loss_fn, nn.parallel.DistributedDataParallel):
        return loss_fn.no_sync()
    if hasattr(loss_fn, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(loss_fn)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(loss_fn) -> Iterator[None]:
    loss_fn.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        loss_fn.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_parameters(loss_fn: nn.Module) -> Iterator[None]:
    """Inside the block every parameter is whole on every process (FSDP: all-gathered; a collective)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in loss_fn.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def to_local(obj):
    """Replace DTensors in a (nested) state by their local shards, for `torch.save`."""
    if hasattr(obj, "to_local"):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_local(v) for v in obj)
    return obj
