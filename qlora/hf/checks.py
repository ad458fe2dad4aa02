"""Checks of a model folder's tensors as the stream loader (`qlora.hf.load`) reads them.

A folder's weights are a user file too. Three ways they used to go wrong:

- a NaN or Inf weight died deep in the quantiser ("x contains 1 NaN/Inf value(s)") with a
  traceback, or, in a tensor kept 16-bit, loaded silently and gave `loss nan`;
- an int8 tensor where a float weight belongs died in `qlora.quant.api` with a traceback;
- a config.json with fewer layers than the weights (num_hidden_layers=1 against 2-layer weights)
  loaded, silently dropping the extra layers.

`check_tensor` (each tensor as it is read: a floating-point one where the model has one, and
finite; one `isfinite` pass over bytes the loader reads anyway) and `check_unused` (before
anything is read: every checkpoint tensor is read, apart from what transformers itself ignores:
a tied output head, non-persistent buffers saved by old versions, the class's
`_keys_to_ignore_on_load_unexpected`) raise a UsageError naming the tensor and its file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.hf.folder import tied_output_name


def floating_names(model: nn.Module) -> set[str]:
    """The model's floating-point parameters (buffers may hold -inf masks on purpose)."""
    return {name for name, value in model.named_parameters(remove_duplicate=False) if value.is_floating_point()}


def check_tensor(key: str, file: Path | str, tensor: torch.Tensor, floating: bool) -> None:
    """A checkpoint tensor read for a model parameter that is `floating` (else: a buffer, or an
    integer parameter, which are not checked)."""
    if not floating:
        return
    if not tensor.is_floating_point():
        raise UsageError(f"{file}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                         "but a floating-point weight belongs there (bf16 / fp16 / fp32)")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise UsageError(f"{file}: tensor {key!r} has {bad} non-finite value(s) (NaN / Inf); refusing to use "
                         "a damaged file")


def check_unused(model: nn.Module, files: Mapping[str, Path], reads: Iterable[str]) -> None:
    """Every checkpoint tensor is read, or a UsageError naming the ones the model has no place for."""
    unused = set(files) - set(reads)
    tied = tied_output_name(model)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = {leaf for module in model.modules() for leaf in module._non_persistent_buffers_set}
    unused = sorted(k for k in unused
                    if not (tied and (k.startswith(tied + ".") or k.endswith("." + tied + ".weight")))
                    and k.rpartition(".")[2] not in buffers and not any(p.search(k) for p in ignore))
    if unused:
        where = sorted({files[k].name for k in unused})
        raise UsageError(f"{files[unused[0]].parent}: {len(unused)} checkpoint tensor(s) in {', '.join(where)} have no "
                         f"place in the {type(model).__name__} its config.json describes, e.g. {unused[:4]} "
                         "(a config.json for a smaller model, e.g. fewer num_hidden_layers?)")
