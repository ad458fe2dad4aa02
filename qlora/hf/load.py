"""Load a Hugging Face causal LM with its linear layers quantised to 4 bits as they stream in.

Loading a 7B model the ordinary way materialises all of it in bf16 (14 GB) before quantising. Here
the model is built from its config with every *parameter* on the ``meta`` device (no storage), then
the safetensors shards are opened with mmap and read one tensor at a time:

    target nn.Linear weight  -> cast to compute dtype -> quantize_4bit -> Linear4bit  (bf16 copy freed)
    any other tensor         -> cast (floating point) to compute dtype -> assigned in place

so the peak is about the 4-bit model plus one bf16 weight, never the bf16 model. Buffers are NOT put
on meta: non-persistent ones (rotary ``inv_freq``) are not in checkpoints, so they are computed by the
modules' own constructors on the CPU (they are tiny) and moved to the target device at the end. After
loading, every parameter and buffer must be off ``meta``; anything left is an error naming it.

Checkpoint names reach module names through transformers' own conversion mapping
(`qlora.hf.convert`: dense renames such as gpt_neox's ``embed_out``, and mixture-of-experts
checkpoints whose one-tensor-per-expert layout is stacked into fused 3-D parameters); those fused
expert weights stream in expert by expert and are stored in 4 bits per expert
(`qlora.hf.experts`, `qlora.nn.experts4bit.Experts4bit`). Checkpoint tensors that feed nothing
are an error naming them, as is a checkpoint in a quantised format qlora does not read.

Handled on the way: tied embeddings (the output projection is tied to the input embedding after
loading and never quantised), checkpoint key prefixes (a checkpoint saved from the bare backbone, or
with an extra ``model.`` prefix), GPT-2's ``Conv1D`` (weight stored (in, out): converted to an
``nn.Linear`` with the transposed weight, identical maths; the names are kept in
``model.qlora_conv1d`` so exports can transpose back), and pre-quantised folders (a bitsandbytes
``quantization_config`` with ``load_in_4bit``): their packed weights and states load as they are,
without re-quantising. Only safetensors are read; pickle checkpoints are refused. A progress bar
(`qlora.progress`, terminals only) counts the checkpoint bytes read.

The 4-bit format is one ``QuantFormat`` value; module filters are ``(module, fqn) -> bool`` functions
applied by one post-order swap (``qlora.nn.swap.swap_modules``), and ``skip_modules`` names modules by
the rule of ``qlora.nn.swap.name_matches``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.hf.checks import check_tensor, check_unused, floating_names
from qlora.hf.convert import checkpoint_sources
from qlora.hf.experts import expert_weight_names, refuse_foreign_quantisation, stream_stacked
from qlora.hf.files import tensor_nbytes, weight_files
from qlora.hf.folder import bnb_4bit_config, load_config, model_folder, tied_output_name
from qlora.nn import Linear4bit
from qlora.nn.moe import use_qlora_experts
from qlora.nn.swap import name_matches, swap_modules
from qlora.progress import byte_bar
from qlora.quant import QuantState
from qlora.quant.format import QuantFormat

if TYPE_CHECKING:
    from qlora.config import RecipeConfig

InitLinear = Callable[[nn.Module, str, torch.Tensor, "torch.Tensor | None"], Linear4bit]

def _empty_model(config, compute_dtype: torch.dtype, trust_remote_code: bool,
                 attn_implementation: str | None = None) -> nn.Module:
    """The architecture with parameters on meta and buffers computed for real (see module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=compute_dtype, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
    except (ValueError, ImportError) as err:
        if attn_implementation and (isinstance(err, ImportError) or "attention" in str(err).lower()):
            raise UsageError(f"model.attn_implementation: {attn_implementation!r} cannot be used here "
                             f"({str(err).splitlines()[0]}); 'sdpa' and 'eager' work everywhere") from None
        if isinstance(err, ImportError):
            raise
        raise UsageError(
            f"model_type {getattr(config, 'model_type', None)!r} is not a causal LM transformers "
            f"knows ({str(err).splitlines()[0]})"
        ) from err
    _conv1d_to_linear(model)
    return model


def _conv1d_to_linear(model: nn.Module) -> None:
    """Swap GPT-2 style ``Conv1D`` (weight (in, out)) for ``nn.Linear`` shells on meta."""
    from transformers.pytorch_utils import Conv1D

    def build(conv: nn.Module) -> nn.Linear:
        n_in, n_out = conv.weight.shape
        return nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)

    model.qlora_conv1d = swap_modules(model, lambda m, _: isinstance(m, Conv1D), build)


# ================================================================================ streaming


class _Checkpoint:
    """Random access to checkpoint tensors by key across mmapped safetensors files."""

    def __init__(self, files: dict[str, Path], stack: ExitStack,
                 on_read: Callable[[int], object] = lambda nbytes: None) -> None:
        from safetensors import safe_open

        self.files, self.on_read = files, on_read
        self._handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(files.values())}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, lambda handle: handle.get_tensor(key))

    def expert(self, key: str, e: int) -> torch.Tensor:
        """Row ``e`` of a stacked (E, ...) tensor: only that expert's bytes are read."""
        return self._read(key, lambda handle: handle.get_slice(key)[e])

    def _read(self, key: str, read: Callable) -> torch.Tensor:
        try:
            tensor = read(self._handles[self.files[key]])
        except Exception as err:
            raise UsageError(f"{self.files[key]}: cannot read tensor {key!r} ({err})") from err
        self.on_read(tensor.numel() * tensor.element_size())  # the bytes it has on disk
        return tensor


def _set_tensor(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Assign ``value`` to the parameter or buffer ``fqn`` (replacing the meta placeholder)."""
    owner_name, _, leaf = fqn.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        owner._buffers[leaf] = value


def _check_shape(ckpt: _Checkpoint, key: str, fqn: str, want: tuple[int, ...], transposed: bool) -> None:
    got = ckpt.shape(key)
    got = got[::-1] if transposed else got
    if got != want:
        raise UsageError(
            f"{ckpt.files[key].name}: tensor {key!r} has shape {got}, but module parameter {fqn!r} "
            f"expects {want} (a checkpoint for a different config?)"
        )


def _group_by_module(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for fqn in names:
        groups.setdefault(fqn.rpartition(".")[0], []).append(fqn)
    return groups


def _stream(
    model: nn.Module,
    ckpt: _Checkpoint,
    names: dict[str, str],
    quantise: set[str],
    prequantised: set[str],
    make_4bit: Callable[[str, torch.Tensor, torch.Tensor | None], Linear4bit],
    compute_dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill ``model`` module by module from ``ckpt`` (see module docstring)."""
    conv1d = set(model.qlora_conv1d)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    floating = floating_names(model)
    for owner, fqns in _group_by_module(names).items():
        tensors = {}
        for fqn in fqns:
            key, leaf = names[fqn], fqn.rpartition(".")[2]
            if owner in prequantised and leaf == "weight":
                continue  # read below, together with its quantisation state
            _check_shape(ckpt, key, fqn, shapes[fqn], owner in conv1d and leaf == "weight")
            tensor = ckpt.get(key)
            check_tensor(key, ckpt.files[key], tensor, fqn in floating)
            tensor = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor  # cast on the host
            tensor = _to_device(tensor, device)
            tensors[leaf] = tensor.t().contiguous() if owner in conv1d and leaf == "weight" else tensor
        if owner in prequantised:
            _swap(model, owner, _load_prequantised(model, ckpt, names, owner, tensors.get("bias"), compute_dtype, device))
        elif owner in quantise:
            _swap(model, owner, make_4bit(owner, tensors.pop("weight"), tensors.get("bias")))
        else:
            for leaf, tensor in tensors.items():
                _set_tensor(model, f"{owner}.{leaf}" if owner else leaf, tensor)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device`; to CUDA through pinned memory, without waiting for the copy.

    Note: bounded transient. A weight reaches the GPU already in the compute dtype (cast on the
    host), so the device holds one 16-bit copy of the weight being quantised plus the kernels'
    output (packed codes, 0.5 byte a weight; the Triton quantiser works tile by tile): under 2x
    the 16-bit size of the largest weight, never the fp32 checkpoint tensor.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def _load_prequantised(model, ckpt, names, owner, bias, compute_dtype, device) -> Linear4bit:
    """A Linear4bit from a bitsandbytes-layout checkpoint entry (no re-quantisation)."""
    key = names[f"{owner}.weight"]
    parts = {k: ckpt.get(k).to(device) for k in ckpt.files if k.startswith(key + ".")}
    try:
        state = QuantState.from_dict(parts, prefix=key + ".")
        layer = Linear4bit.from_quantized(ckpt.get(key).to(device), state, bias=bias, compute_dtype=compute_dtype)
    except ValueError as err:
        raise UsageError(f"{ckpt.files[key].name}: 4-bit weight {key!r} is malformed ({err})") from err
    linear = model.get_submodule(owner)
    if (layer.out_features, layer.in_features) != (linear.out_features, linear.in_features):
        raise UsageError(
            f"{ckpt.files[key].name}: 4-bit weight {key!r} has shape {tuple(state.shape)}, module "
            f"{owner!r} expects {(linear.out_features, linear.in_features)}"
        )
    return layer


# ================================================================================ public: load


def load_model(
    name_or_path: str | Path,
    *,
    quant: QuantFormat | None = QuantFormat(),
    dtype: torch.dtype | None = None,
    skip_modules: Sequence[str] = ("lm_head",),
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    init_linear: InitLinear | None = None,
) -> nn.Module:
    """Load a causal LM, quantising every ``nn.Linear`` not named in ``skip_modules`` as it streams in.

    Args:
        name_or_path: a model folder, a hub id in the local cache, or a built-in name
            ("smollm2-135m", "tiny-llama").
        quant: the 4-bit format of the quantised linears (its ``compute_dtype`` is theirs), or
            None to load everything in ``dtype`` (16-bit LoRA, merging).
        dtype: dtype of every unquantised parameter (embeddings, norms, lm_head); defaults to
            ``quant.compute_dtype`` (bf16 without ``quant``).
        skip_modules: module names kept unquantised (``qlora.nn.swap.name_matches``). A tied
            lm_head is never quantised.
        device: where the model ends up; tensors are moved there (and quantised there) one by one.
        attn_implementation: transformers' attention kernel ("sdpa", "eager", ...); None: its default.
        init_linear: builds each quantised layer instead of plain quantisation, from
            (model, fqn, 16-bit weight, bias): where LoftQ / PiSSA see each weight
            (`qlora.adapters.init.AdapterInit`).

    A folder whose config.json carries a bitsandbytes 4-bit ``quantization_config`` loads as it is
    stored (``quant`` is then ignored).
    Returns the transformers model in eval mode, with ``model.qlora_conv1d`` as described above.
    """
    compute_dtype = dtype or (quant.compute_dtype if quant is not None else torch.bfloat16)
    folder = model_folder(name_or_path)
    config = load_config(folder, trust_remote_code)
    refuse_foreign_quantisation(config, folder)
    stored_4bit = bnb_4bit_config(config)
    if stored_4bit is not None:
        del config.quantization_config
    files = weight_files(folder)
    device = torch.device(device)
    model = _empty_model(config, compute_dtype, trust_remote_code, attn_implementation)
    tied_head = tied_output_name(model)
    expected = [k for k in model.state_dict() if tied_head is None or not k.startswith(tied_head + ".")]
    sources = checkpoint_sources(model, expected, files)
    missing = [k for k in expected if k not in sources.pieces]
    if missing:
        raise UsageError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the {type(model).__name__} "
            f"needs, e.g. {missing[:5]}"
        )
    fused = expert_weight_names(model)
    stacked = {f for f, pieces in sources.pieces.items() if len(pieces) > 1 or f in fused}
    names = {f: sources.pieces[f][0].key for f in expected if f not in stacked}  # in model order
    linears = {fqn for fqn, m in model.named_modules() if _plain_linear(m) and fqn != tied_head}
    prequantised = {f for f in linears if any(k.startswith(names[f"{f}.weight"] + ".quant_state.") for k in files)}
    quantise = set() if stored_4bit or quant is None else {f for f in linears if not name_matches(f, skip_modules)}

    def make_4bit(fqn: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit:
        if init_linear is not None:
            return init_linear(model, fqn, weight, bias)
        return Linear4bit.quantize(weight, quant, bias)

    quant_parts = tuple(names[f"{f}.weight"] + "." for f in prequantised)  # read beside their weight
    reads = {p.key for pieces in sources.pieces.values() for p in pieces} | {k for k in files if k.startswith(quant_parts)}
    check_unused(model, files, reads)
    experts_fmt = None if stored_4bit or quant is None or name_matches("experts", skip_modules) else quant
    nbytes = tensor_nbytes(files.values())
    with ExitStack() as stack:
        bar = stack.enter_context(byte_bar(sum(nbytes[k] for k in reads), f"load {folder.name}"))
        ckpt = _Checkpoint(files, stack, bar.update)
        _stream(model, ckpt, names, quantise, prequantised, make_4bit, compute_dtype, device)
        if stream_stacked(model, ckpt, sources, stacked, experts_fmt, compute_dtype, device):
            use_qlora_experts(model)
    if tied_head is not None:
        model.tie_weights()
    _finish(model, device)
    model.config._name_or_path = str(folder)
    return model.eval()


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's: a subclass computing more (Phi-MoE's router
    returns its top-k) keeps its 16-bit weight."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _finish(model: nn.Module, device: torch.device) -> None:
    """Move buffers to ``device`` and check nothing is left on meta."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise UsageError(f"after loading, {len(left)} tensor(s) have no value (still on meta): {left[:8]}")


def load_base_model(cfg: "RecipeConfig", device: torch.device, *, name_or_path: str | Path | None = None,
                    init_linear: InitLinear | None = None) -> nn.Module:
    """The recipe's base model: 4-bit per `cfg.quant` (16-bit with quant.enabled=false), in `cfg.model.dtype`.

    `name_or_path` replaces `cfg.model.name_or_path` (a run's saved base); `init_linear` as in `load_model`.
    """
    from qlora.dtypes import torch_dtype

    m = cfg.model
    fmt = cfg.quant.format(m.dtype) if cfg.quant.enabled else None
    return load_model(name_or_path or m.name_or_path, quant=fmt, dtype=torch_dtype(m.dtype),
                      skip_modules=tuple(cfg.quant.skip_modules), trust_remote_code=m.trust_remote_code,
                      device=device, attn_implementation=m.attn_implementation, init_linear=init_linear)
