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

Handled on the way: tied embeddings (the output projection is tied to the input embedding after
loading and never quantised), checkpoint key prefixes (a checkpoint saved from the bare backbone, or
with an extra ``model.`` prefix), GPT-2's ``Conv1D`` (weight stored (in, out): converted to an
``nn.Linear`` with the transposed weight, identical maths; the names are kept in
``model.qlora_conv1d`` so exports can transpose back), and pre-quantised folders (a bitsandbytes
``quantization_config`` with ``load_in_4bit``): their packed weights and states load as they are,
without re-quantising. Only safetensors are read; pickle checkpoints are refused.

The module filters used for quantisation and for LoRA are ``(module, fqn) -> bool`` functions, applied
by one post-order swap (``qlora.surgery.swap_modules``).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from qlora.embedded import EMBEDDED_MODELS, resolve_model
from qlora.errors import UsageError
from qlora.nn import Linear4bit
from qlora.quant import QuantState, quantize_4bit
from qlora.surgery import swap_modules

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ================================================================================ locating files


def model_folder(name_or_path: str | Path) -> Path:
    """A local folder for a built-in name, a folder path, or a hub id already in the local HF cache."""
    resolved = Path(resolve_model(name_or_path)).expanduser()
    if resolved.is_dir():
        return resolved
    name = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not resolved.exists():
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as err:  # offline, unknown repo, no network: one message for all
            raise UsageError(f"model {name!r}: not a local folder and not downloadable ({err})") from err
    raise UsageError(
        f"model {name!r}: no such folder; expected a Hugging Face model folder (config.json + "
        f"*.safetensors), a hub id, or a built-in name ({', '.join(EMBEDDED_MODELS)})"
    )


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every checkpoint key to its safetensors file (honouring a sharded folder's index)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UsageError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise UsageError(f"{index} names shard files that do not exist: {missing}")
        return {key: folder / f for key, f in weight_map.items()}
    single = folder / SAFE_WEIGHTS
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"{folder}: only pickle checkpoints found ({', '.join(pickles)}); qlora loads "
                "safetensors only, since unpickling can run arbitrary code. Convert them to "
                "safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
            )
        raise UsageError(f"{folder}: no {SAFE_WEIGHTS}, {SAFE_INDEX} or *.safetensors file")
    return {key: f for f in files for key in _safetensors_keys(f)}


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise UsageError(f"{path}: not a readable safetensors file ({err})") from err


def load_config(folder: Path, trust_remote_code: bool = False):
    """The model's transformers config, with a clear error for a missing or unreadable config.json."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UsageError(f"{folder / 'config.json'}: cannot be read as a transformers config ({err})") from err


def bnb_4bit_config(config) -> dict | None:
    """The config's bitsandbytes 4-bit ``quantization_config`` as a dict, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit"):
        return qc
    raise UsageError(
        f"quantization_config {qc.get('quant_method')!r} (load_in_4bit={qc.get('load_in_4bit')}) is "
        "not supported; qlora loads unquantised folders or bitsandbytes 4-bit ones"
    )


# ================================================================================ the empty model


def _empty_model(config, compute_dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The architecture with parameters on meta and buffers computed for real (see module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=compute_dtype, trust_remote_code=trust_remote_code
            )
    except ValueError as err:
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


def tied_output_name(model: nn.Module) -> str | None:
    """The fqn of the output projection (lm_head) when it is tied to the input embedding."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def name_matches(fqn: str, names: Iterable[str]) -> bool:
    """True when one of ``names`` is a run of whole dotted components of ``fqn`` ("lm_head",
    "mlp.down_proj", "model.layers.0")."""
    return any(f".{name}." in f".{fqn}." for name in names)


# ================================================================================ streaming


class _Checkpoint:
    """Random access to checkpoint tensors by key across mmapped safetensors files."""

    def __init__(self, files: dict[str, Path], stack: ExitStack) -> None:
        from safetensors import safe_open

        self.files = files
        self._handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(files.values())}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.files[key]].get_tensor(key)
        except Exception as err:
            raise UsageError(f"{self.files[key]}: cannot read tensor {key!r} ({err})") from err


def _checkpoint_names(model: nn.Module, expected: Sequence[str], keys: set[str]) -> dict[str, str]:
    """model key -> checkpoint key, trying no prefix change, a stripped and an added base prefix."""
    prefix = getattr(model, "base_model_prefix", "") or "model"
    options = (
        lambda k: k,
        lambda k: k[len(prefix) + 1 :] if k.startswith(prefix + ".") else k,
        lambda k: f"{prefix}.{k}",
    )
    best = max(options, key=lambda rename: sum(rename(k) in keys for k in expected))
    return {k: best(k) for k in expected}


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
    make_4bit: Callable[[torch.Tensor, torch.Tensor | None], Linear4bit],
    compute_dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill ``model`` module by module from ``ckpt`` (see module docstring)."""
    conv1d = set(model.qlora_conv1d)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for owner, fqns in _group_by_module(names).items():
        tensors = {}
        for fqn in fqns:
            key, leaf = names[fqn], fqn.rpartition(".")[2]
            if owner in prequantised and leaf == "weight":
                continue  # read below, together with its quantisation state
            _check_shape(ckpt, key, fqn, shapes[fqn], owner in conv1d and leaf == "weight")
            tensor = ckpt.get(key).to(device)
            if owner in conv1d and leaf == "weight":
                tensor = tensor.t().contiguous()
            tensors[leaf] = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor
        if owner in prequantised:
            _swap(model, owner, _load_prequantised(model, ckpt, names, owner, tensors.get("bias"), compute_dtype, device))
        elif owner in quantise:
            _swap(model, owner, make_4bit(tensors.pop("weight"), tensors.get("bias")))
        else:
            for leaf, tensor in tensors.items():
                _set_tensor(model, f"{owner}.{leaf}" if owner else leaf, tensor)


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


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, hub id or built-in name (a pad token is set to eos if absent)."""
    from transformers import AutoTokenizer

    folder = model_folder(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UsageError(f"{folder}: cannot load a tokenizer ({err})") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | Path,
    *,
    quantize: bool = True,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Sequence[str] = ("lm_head",),
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a causal LM, quantising every ``nn.Linear`` not named in ``skip_modules`` as it streams in.

    Args:
        name_or_path: a model folder, a hub id in the local cache, or a built-in name
            ("smollm2-135m", "tiny-llama").
        quantize: False loads everything in ``compute_dtype`` (16-bit LoRA, merging).
        quant_type, blocksize, double_quant, quant_storage: the 4-bit format (see ``qlora.quant``).
        compute_dtype: dtype of the matmuls and of every unquantised parameter (embeddings, norms,
            lm_head).
        skip_modules: module names kept unquantised; an entry matches whole dotted components of a
            module's name (like transformers' ``llm_int8_skip_modules``). A tied lm_head is never
            quantised.
        device: where the model ends up; tensors are moved there (and quantised there) one by one.

    A folder whose config.json carries a bitsandbytes 4-bit ``quantization_config`` loads as it is
    stored (``quantize`` and the format arguments are then ignored).
    Returns the transformers model in eval mode, with ``model.qlora_conv1d`` as described above.
    """
    folder = model_folder(name_or_path)
    config = load_config(folder, trust_remote_code)
    stored_4bit = bnb_4bit_config(config)
    if stored_4bit is not None:
        del config.quantization_config
    files = weight_files(folder)
    device = torch.device(device)
    model = _empty_model(config, compute_dtype, trust_remote_code)
    tied_head = tied_output_name(model)
    expected = [k for k in model.state_dict() if tied_head is None or not k.startswith(tied_head + ".")]
    names = _checkpoint_names(model, expected, set(files))
    missing = [k for k, ck in names.items() if ck not in files]
    if missing:
        raise UsageError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the {type(model).__name__} "
            f"needs, e.g. {missing[:5]}"
        )
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn != tied_head}
    prequantised = {f for f in linears if any(k.startswith(names[f"{f}.weight"] + ".quant_state.") for k in files)}
    quantise = set() if stored_4bit or not quantize else {f for f in linears if not name_matches(f, skip_modules)}

    def make_4bit(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit:
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant, quant_storage)
        return Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=compute_dtype)

    with ExitStack() as stack:
        ckpt = _Checkpoint(files, stack)
        _stream(model, ckpt, names, quantise, prequantised, make_4bit, compute_dtype, device)
    if tied_head is not None:
        model.tie_weights()
    _finish(model, device)
    model.config._name_or_path = str(folder)
    return model.eval()


def _finish(model: nn.Module, device: torch.device) -> None:
    """Move buffers to ``device`` and check nothing is left on meta."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise UsageError(f"after loading, {len(left)} tensor(s) have no value (still on meta): {left[:8]}")
