"""Adapter composition: several LoRA adapters -> one, as pure functions over adapter state dicts.

Adapter i on module m has A_i (r_i, in), B_i (out, r_i), scaling s_i and a user weight w_i; its
update is w_i * s_i * B_i @ A_i. The methods are PEFT's `add_weighted_adapter` ones, with its
maths (so the results equal PEFT's, tested), and every result is written with alpha = r, so its
own scaling is 1:

    cat        A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]  B = [B_1, B_2, ...]    rank sum r_i, exact:
               B @ A = sum_i w_i s_i B_i @ A_i. Each adapter's scaling is folded into its rows,
               so adapters of different ranks and scalings concatenate without a refusal.
    factor     (linear, ties, dare_linear, dare_ties, magnitude_prune) combine the A's and the B's
               separately with the weights sqrt(|w_i s_i|) (the sign on A's side): cheap, keeps
               rank r, but B @ A is NOT sum_i w_i s_i B_i @ A_i (the cross terms B_i @ A_j stay),
               so it needs one rank r for all and is a rough blend (PEFT says as much).
    *_svd      (svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd) combine the
               fp32 deltas D_i = s_i B_i @ A_i, then keep the rank-R truncation of the result:
               D = U S V^T,  B = U[:, :R] S[:R],  A = V^T[:R]  (Eckart-Young: the best rank-R
               approximation in Frobenius norm). R defaults to max r_i. Costs an SVD per module.

What "combine" means for a list of task tensors T_i (A's, B's or deltas) with weights c_i:

    linear / svd         sum_i c_i T_i
    magnitude_prune      sum_i c_i top_k(T_i)            top_k keeps the density * numel largest |x|
    ties (Yadav 2023)    top_k, elect the sign of sum_i top_k(T_i) per element, then the mean of
                         the c_i-weighted entries that agree with it (disjoint merge)
    dare_* (Yu 2023)     drop each entry with probability 1 - density and rescale the kept ones by
                         1 / density (unbiased), then linear or the TIES sign election

DARE's masks come from a generator seeded per module by `module_seed(seed, fqn)`, drawn in
PEFT's order within the module (the A's, then the B's; or the deltas): the same seed gives the
same adapter whatever other modules or key order there are, and setting torch's global seed to
`module_seed` before PEFT's `add_weighted_adapter` reproduces PEFT's masks for that module.

Differences from PEFT, on purpose: a single adapter is combined by the method asked for (PEFT
falls back to linear), so `--method svd --rank 4` truncates one adapter; the result is written
with `use_rslora: false` (PEFT copies the first adapter's flag, which turns its scaling of 1 into
sqrt(r) when that adapter used rsLoRA); and `--rank` above a module's min(out, in) is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from qlora.adapters.fit import check_finite, check_fits, meta_base, shapes
from qlora.adapters.peft_format import lora_pairs, peft_key, read_adapter_weights
from qlora.adapters.spec import LoraSpec, read_spec
from qlora.choices import COMBINE_METHODS
from qlora.errors import UsageError
from qlora.nn.lora import lora_delta

log = logging.getLogger("qlora")
Pair = tuple[torch.Tensor, torch.Tensor]
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Adapter:
    """One adapter as data: where it came from, its spec, base, raw target_modules and (A, B) pairs."""

    name: str
    spec: LoraSpec
    base: str
    target_modules: list[str] | str
    pairs: dict[str, Pair]


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """An adapter folder as an `Adapter` (its tensors in their stored dtype)."""
    spec, config = read_spec(adapter_dir)
    if spec.use_dora:  # combining only the low-rank parts would silently drop the magnitudes
        raise UsageError(f"{adapter_dir}: a DoRA adapter (use_dora); combine takes LoRA adapters only")
    pairs = lora_pairs(read_adapter_weights(adapter_dir))
    return Adapter(str(adapter_dir), spec, str(config.get("base_model_name_or_path") or ""),
                   config["target_modules"], pairs)


def module_seed(seed: int, fqn: str) -> int:
    """The seed of module `fqn`'s DARE masks: a stable 63-bit hash of (seed, fqn)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{fqn}".encode()).digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------ task tensors
def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries zeroed."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by `density`."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator) / density


def combine_tensors(tensors: list[torch.Tensor], weights: list[float], task: str, density: float | None,
                    generator: torch.Generator) -> torch.Tensor:
    """One fp32 tensor from same-shaped fp32 `tensors` by `task` (see the module docstring)."""
    if task in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif task.startswith("dare"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
    if task not in ("ties", "dare_ties"):
        return weighted.sum(0)
    agrees = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1, -1)  # the elected sign, per entry
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


# ------------------------------------------------------------------------------- per module
def _cat(pairs: list[Pair], weights: list[float], scalings: list[float], rank: int) -> Pair:
    """[w_1 s_1 A_1; w_2 s_2 A_2; ...], [B_1, B_2, ...], zero-padded to `rank`."""
    lora_A = torch.cat([a.float() * w * s for (a, _), w, s in zip(pairs, weights, scalings)])
    lora_B = torch.cat([b.float() for _, b in pairs], dim=1)
    pad = rank - lora_A.shape[0]
    return torch.nn.functional.pad(lora_A, (0, 0, 0, pad)), torch.nn.functional.pad(lora_B, (0, pad))


def _factors(pairs: list[Pair], scales: list[float], task: str, density: float | None,
             generator: torch.Generator) -> Pair:
    """A's and B's combined separately, weighted sqrt(|c_i|) with the sign of c_i on A's side."""
    roots = [math.sqrt(abs(c)) for c in scales]
    signed = [r if c >= 0 else -r for r, c in zip(roots, scales)]
    lora_A = combine_tensors([a.float() for a, _ in pairs], signed, task, density, generator)
    lora_B = combine_tensors([b.float() for _, b in pairs], roots, task, density, generator)
    return lora_A, lora_B


def _svd(pairs: list[Pair], weights: list[float], scalings: list[float], task: str, density: float | None,
         generator: torch.Generator, rank: int) -> Pair:
    """The rank-`rank` truncation of the combined deltas s_i B_i @ A_i, as (A, B)."""
    deltas = [lora_delta(a.float(), b.float(), s) for (a, b), s in zip(pairs, scalings)]
    delta = combine_tensors(deltas, weights, task, density, generator)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


# ----------------------------------------------------------------------------------- checks
def check_combinable(adapters: Sequence[Adapter], weights: Sequence[float], method: str,
                     density: float | None, rank: int | None) -> None:
    """A UsageError naming the first reason these adapters cannot be combined by `method`."""
    if method not in COMBINE_METHODS:
        raise UsageError(f"--method {method!r} is not a combination method; allowed: {', '.join(COMBINE_METHODS)}")
    if not adapters or len(weights) != len(adapters):
        raise UsageError(f"combine needs one weight per adapter; got {len(adapters)} adapters, {len(weights)} weights")
    for adapter, weight in zip(adapters, weights):
        if not math.isfinite(weight):
            raise UsageError(f"--adapter {adapter.name}:{weight}: the weight must be a finite number")
    bases = {a.base for a in adapters}
    if len(bases) > 1:
        listed = ", ".join(f"{a.name}: {a.base!r}" for a in adapters)
        raise UsageError(f"adapters were trained on different bases (base_model_name_or_path: {listed})")
    svd = method == "svd" or method.endswith("_svd")
    task = method.removesuffix("_svd")
    if (density is not None) != (task in PRUNING):
        raise UsageError(f"--density is needed by (and only by) the pruning methods {', '.join(PRUNING)} "
                         f"and their _svd forms; method {method!r}, density {density!r}")
    if density is not None and not 0 < density <= 1:
        raise UsageError(f"--density {density}: expected a fraction of entries to keep in (0, 1]")
    if rank is not None and (not svd or rank < 1):
        raise UsageError(f"--rank {rank}: expected an int >= 1, and only with an _svd method (got {method!r})")
    _check_expert_targets(adapters, method)
    ranks = {a.spec.r for a in adapters}
    if not svd and method != "cat" and len(ranks) > 1:
        listed = ", ".join(f"{a.name}: r={a.spec.r}" for a in adapters)
        raise UsageError(f"method {method!r} combines A and B factors and needs one rank for all ({listed}); "
                         "use cat or an _svd method")
    _check_shapes(adapters, rank if svd else None)


def _check_expert_targets(adapters: Sequence[Adapter], method: str) -> None:
    """Expert adapters (PEFT `target_parameters`) combine factor by factor only: their lora_A / lora_B
    hold E experts each (qlora.nn.moe), which `cat`'s rank concatenation and an SVD of B @ A mix up."""
    targets = {a.spec.target_parameters for a in adapters}
    if targets == {()}:
        return
    if len(targets) > 1:
        listed = ", ".join(f"{a.name}: {list(a.spec.target_parameters)}" for a in adapters)
        raise UsageError(f"adapters adapt different expert parameters (target_parameters: {listed})")
    if method == "cat" or method == "svd" or method.endswith("_svd"):
        raise UsageError(f"--method {method!r}: expert adapters (target_parameters) combine with a factor method "
                         f"only ({', '.join(m for m in COMBINE_METHODS if m != 'cat' and not m.endswith('svd'))})")


def _check_shapes(adapters: Sequence[Adapter], rank: int | None) -> None:
    """Every module has one (in, out) shape across the adapters, and room for `rank`."""
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for fqn, (lora_A, lora_B) in adapter.pairs.items():
            shape = (lora_A.shape[1], lora_B.shape[0])
            seen, where = shapes.setdefault(fqn, (shape, adapter.name))
            if seen != shape:
                raise UsageError(f"module {fqn!r} has (in, out) {seen} in {where} but {shape} in {adapter.name}: "
                                 "the adapters were not made for the same model")
            if rank is not None and rank > min(shape):
                raise UsageError(f"--rank {rank} exceeds min(in, out) = {min(shape)} of module {fqn!r}")


# ---------------------------------------------------------------------------------- combine
def combine(adapters: Sequence[Adapter], weights: Sequence[float], method: str, *, density: float | None = None,
            rank: int | None = None, seed: int = 0, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-keyed tensors, PEFT adapter config) of the adapters combined by `method`.

    Modules adapted by only some adapters combine those. `dtype` defaults to the first adapter's;
    the maths runs in fp32. See the module docstring for the methods and their maths.
    """
    check_combinable(adapters, weights, method, density, rank)
    task = "linear" if method == "svd" else method.removesuffix("_svd")
    new_rank = {"cat": sum(a.spec.r for a in adapters)}.get(method, max(a.spec.r for a in adapters))
    new_rank = rank or new_rank
    dtype = dtype or next(iter(adapters[0].pairs.values()))[0].dtype
    tensors = {}
    for fqn in _modules(adapters):
        present = [(a.pairs[fqn], w, a.spec.scaling) for a, w in zip(adapters, weights) if fqn in a.pairs]
        pairs, ws, ss = ([item[i] for item in present] for i in range(3))
        generator = torch.Generator().manual_seed(module_seed(seed, fqn))
        if method == "cat":
            lora_A, lora_B = _cat(pairs, ws, ss, new_rank)
        elif method == task:
            lora_A, lora_B = _factors(pairs, [w * s for w, s in zip(ws, ss)], task, density, generator)
        else:
            lora_A, lora_B = _svd(pairs, ws, ss, task, density, generator, new_rank)
        tensors[peft_key(fqn, "lora_A")] = lora_A.to(dtype).contiguous()
        tensors[peft_key(fqn, "lora_B")] = lora_B.to(dtype).contiguous()
    spec = LoraSpec(r=new_rank, alpha=new_rank, dropout=adapters[0].spec.dropout,
                    target_parameters=adapters[0].spec.target_parameters)
    return tensors, spec.peft_config(_target_modules(adapters), adapters[0].base)


def _modules(adapters: Sequence[Adapter]) -> list[str]:
    """Every adapted module, in the first adapter's order, then the ones only later adapters add."""
    return list(dict.fromkeys(fqn for a in adapters for fqn in a.pairs))


def _target_modules(adapters: Sequence[Adapter]) -> list[str] | str:
    """The union of the adapters' targets: their leaf-name lists merged, else a regex of full names."""
    if all(isinstance(a.target_modules, list) for a in adapters):
        return sorted({name for a in adapters for name in a.target_modules})
    return "(" + "|".join(re.escape(fqn) for fqn in _modules(adapters)) + ")"


def check_against_base(adapters: Sequence[Adapter]) -> None:
    """Each adapter fits its base's modules (built on meta from its config.json), when the base is here."""
    try:
        model = meta_base(adapters[0].base)
    except UsageError as err:
        log.warning("cannot check the adapters against their base %r (%s)", adapters[0].base, err)
        return
    for adapter in adapters:
        check_fits(model, shapes(adapter.pairs), adapter.spec.targets, adapter.name,
                   adapter.spec.target_parameters)


def combine_adapters(adapter_dirs: Sequence[str | Path], weights: Sequence[float], out_dir: str | Path, method: str, *,
                     density: float | None = None, rank: int | None = None, seed: int = 0, merge: bool = False,
                     overwrite: bool = False) -> Path:
    """`qlora combine`: write the combined adapter to `out_dir`, or with `merge` a bf16 model folder
    (the combined adapter folded into its base). Every check runs before anything is written: the
    adapters against their base's modules, and the result finite."""
    import tempfile

    from qlora.adapters.merge import merge_adapter
    from qlora.adapters.peft_format import write_adapter
    from qlora.outputs import check_destination, provenance

    kind = "merged" if merge else "combined"
    out_dir = check_destination(out_dir, overwrite, kind, adapter_dirs)
    adapters = [read_adapter(d) for d in adapter_dirs]
    tensors, config = combine(adapters, weights, method, density=density, rank=rank, seed=seed)
    check_against_base(adapters)
    check_finite(tensors, "the combined adapter")
    if not merge:
        return write_adapter(out_dir, tensors, config, provenance=provenance("combined", adapter_dirs))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_adapter(Path(tmp) / "adapter", tensors, config)
        return merge_adapter(adapter, out_dir, overwrite=overwrite, inputs=tuple(adapter_dirs))
