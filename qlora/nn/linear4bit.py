"""`Linear4bit`: a frozen 4-bit linear layer that dequantises on the fly.

The weight W (out_features x in_features) is stored only in its packed 4-bit form (two codes a byte,
bitsandbytes' layout) plus a `QuantState` (block absmax, codebook, double-quant constants). Every
use reconstructs W in the compute dtype, uses it, and drops it:

    forward:   y  = x @ W.T + b                  W = dequantize_4bit(packed, state) -> compute dtype
    backward:  dx = dy @ W                       W dequantised again, never saved
               db = sum(dy)                      only when the bias is trainable
               dW = none                         the 4-bit weight is frozen (QLoRA trains adapters)

Trade-off: the backward pass pays a second dequantisation (a memory-bound pass over the packed
bytes) in exchange for keeping 0.5 byte/param (+0.127 bit/param of state with double quant)
resident instead of 2 bytes/param of bf16 between forward and backward. That is the whole point
of QLoRA: activations and adapters dominate memory, never a dequantised copy of the base weights.

Both directions live in ONE `torch.autograd.Function` (`_Linear4bitFunction`), so it composes
with non-reentrant gradient checkpointing (which re-runs the forward under its own saved-tensor
hooks) and with `torch.compile`. The forward is `matmul_4bit`, which for decode-sized inputs
(<= 8 rows) runs the fused 4-bit matvec instead of materialising W.

Note: quantisation is always an explicit call (`from_linear`); `.to()` / `.cuda()` / `.half()`
only move the packed bytes and the state between devices and never change their dtype (the bytes
are codes, not numbers). The bias is a normal parameter in the compute dtype (frozen by default).

`state_dict()` is exactly bitsandbytes' `Linear4bit` layout (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`, `bias`), and `load_state_dict` accepts it, so checkpoints
written by bitsandbytes / transformers ("bnb-4bit" models) load here and ours load there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.quant import QuantState, dequantize_4bit, matmul_4bit, quantize_4bit
from qlora.quant.format import QuantFormat


class _Linear4bitFunction(torch.autograd.Function):
    """y = x @ dequant(W).T + b, saving only the packed weight for the backward pass."""

    # Note: autocast. x arrives in the compute dtype; a caller's autocast (fp16, say) must not recast
    # the matmuls, so both directions run with autocast off (custom_fwd / custom_bwd keep the pair).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(packed)  # the only tensor kept alive until backward
        ctx.state = state  # its tensors are owned by the module; nothing new is kept
        ctx.has_bias = bias is not None
        # Dequantise into x's dtype + F.linear; for <= 8 rows the fused matvec instead.
        with torch.autocast(x.device.type, enabled=False):
            return matmul_4bit(x, packed, state, bias, workspace=weight_workspace(state.shape, x.dtype, x.device))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_as(packed, ctx.state, grad_out.dtype)
            with torch.autocast(grad_out.device.type, enabled=False):
                grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W.T + bias for a 4-bit W, differentiable in x and bias (never in W).

    `x` must already be in the compute dtype; the result has x's dtype and shape (..., out).
    """
    return _Linear4bitFunction.apply(x, packed, state, bias)


def _dequantize_as(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) decoded straight into `dtype` (no intermediate copy in `state.dtype`)."""
    return dequantize_4bit(packed, state, out=weight_workspace(state.shape, dtype, packed.device))


_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def weight_workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A view of shape `shape` into one reused buffer per (device, dtype), grown to the largest weight.

    Note: one workspace. Every forward and backward decodes a weight and drops it right after its
    matmul, so one buffer per device serves all layers in turn: no allocator traffic (on CPU a
    fresh multi-MB tensor costs page faults that rival the decode itself), and a fixed
    footprint of the largest weight in the compute dtype, which the memory planner counts as
    workspace. Ops on one CUDA stream run in order, so reusing the buffer is safe; under
    `torch.compile` (which plans its own buffers) a fresh tensor is returned.
    """
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    key, numel = (torch.device(device), dtype), math.prod(shape)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def quantize_format(weight: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, QuantState]:
    """`quantize_4bit` with the storage fields of `fmt`: (packed codes, state)."""
    return quantize_4bit(weight, fmt.quant_type, fmt.blocksize, fmt.double_quant, fmt.quant_storage)


def _format_of(state: QuantState, storage: torch.dtype, compute_dtype: torch.dtype) -> QuantFormat:
    """The format a quantised state (+ its packed dtype) is stored in, computed in `compute_dtype`."""
    return QuantFormat(state.quant_type, state.blocksize, state.state2 is not None, storage, compute_dtype)


def _packed_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """Shape of the packed codes for `numel` weights: (n+1)//2 bytes viewed as `storage`."""
    itemsize = torch.empty((), dtype=storage).element_size()
    return ((numel + 1) // (2 * itemsize), 1)


class Linear4bit(nn.Module):
    """A linear layer whose weight is frozen in 4 bits (NF4 / FP4 / Int4).

    Build one with `from_linear` (quantise a trained `nn.Linear`), `quantize` (a weight tensor and a
    `QuantFormat`), `from_quantized` (wrap packed codes + state, e.g. from a checkpoint), or the
    constructor, which mirrors `nn.Linear`: on a real device it quantises a freshly initialised
    weight; on `device="meta"` it builds an empty shell for a loader to fill through
    `load_state_dict` or `set_quantized`.

    Args:
        in_features, out_features: the layer's shape; the weight is (out_features, in_features).
        bias: whether the layer has a bias (a parameter in `compute_dtype`, frozen by default).
        quant_type, blocksize, double_quant, compute_dtype, quant_storage: the `QuantFormat`
            fields (nf4, 64, True, bf16, uint8 by default); or pass `fmt` instead.
        device: where to build the layer; "meta" gives an empty shell.

    The format in use is `self.format`; `quant_type`, `blocksize`, ... read from it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                 quant_storage: torch.dtype = torch.uint8, device: torch.device | str | None = None, *,
                 fmt: QuantFormat | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"Linear4bit: {name}={value!r}; expected a positive integer")
        self.in_features = in_features
        self.out_features = out_features
        self.format = fmt or QuantFormat(quant_type, blocksize, double_quant, quant_storage, compute_dtype)
        self.quant_state: QuantState | None = None
        shell = torch.empty(_packed_shape(in_features * out_features, self.quant_storage),
                            dtype=self.quant_storage, device=device)
        self.weight = nn.Parameter(shell, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=self.compute_dtype, device=device), False) if bias else None
        if self.weight.device.type != "meta":
            self._init_like_nn_linear()

    quant_type = property(lambda self: self.format.quant_type)
    blocksize = property(lambda self: self.format.blocksize)
    double_quant = property(lambda self: self.format.double_quant)
    compute_dtype = property(lambda self: self.format.compute_dtype)
    quant_storage = property(lambda self: self.format.quant_storage)

    def _init_like_nn_linear(self) -> None:
        """Quantise nn.Linear's default initialisation, so a constructed layer is usable."""
        weight = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.set_quantized(*quantize_format(weight, self.format))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: QuantFormat, bias: torch.Tensor | None = None) -> "Linear4bit":
        """Quantise a weight (out, in) to `fmt` (kept in its own dtype as `quant_state.dtype`)."""
        packed, state = quantize_format(weight.detach(), fmt)
        return cls.from_quantized(packed, state, bias=bias, compute_dtype=fmt.compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    quant_storage: torch.dtype = torch.uint8, *, fmt: QuantFormat | None = None) -> "Linear4bit":
        """Quantise `linear`'s weight (kept in its own dtype as `quant_state.dtype`).

        A `linear` on the meta device gives a meta shell with the same configuration. The bias is
        copied in `compute_dtype`. `linear` itself is left untouched.
        """
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"Linear4bit.from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        fmt = fmt or QuantFormat(quant_type, blocksize, double_quant, quant_storage, compute_dtype)
        has_bias = linear.bias is not None
        if linear.weight.device.type == "meta":
            return cls(linear.in_features, linear.out_features, has_bias, device="meta", fmt=fmt)
        bias = linear.bias.detach().to(fmt.compute_dtype).clone() if has_bias else None
        return cls.quantize(linear.weight, fmt, bias)

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """Wrap already-quantised codes and their state (no copy, no re-quantisation)."""
        out_features, in_features = _weight_shape(quant_state, "Linear4bit.from_quantized")
        layer = cls(in_features, out_features, bias is not None, device="meta",
                    fmt=_format_of(quant_state, packed.dtype, compute_dtype))
        layer.set_quantized(packed, quant_state, bias)
        return layer

    def set_quantized(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> None:
        """Install packed codes + state (and optionally a bias) into this layer, e.g. a meta shell.

        The state's shape must be this layer's (out_features, in_features). The packed tensor is
        used as is (its dtype becomes `quant_storage`); the state is moved to its device.
        """
        where = "Linear4bit.set_quantized"
        expected = (self.out_features, self.in_features)
        if _weight_shape(state, where) != expected:
            raise UsageError(f"{where}: quant_state.shape={tuple(state.shape)}, expected {expected} "
                             "(out_features, in_features)")
        _check_packed_size(packed, state, where)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state.to(packed.device)
        self.format = _format_of(state, packed.dtype, self.compute_dtype)
        if bias is not None:
            self._set_bias(bias, "bias")

    def _set_bias(self, bias: torch.Tensor, where: str) -> None:
        if self.bias is None or tuple(bias.shape) != (self.out_features,):
            want = "no bias" if self.bias is None else f"shape ({self.out_features},)"
            raise UsageError(f"Linear4bit: {where} has shape {tuple(bias.shape)}, expected {want}")
        grad = self.bias.requires_grad
        self.bias = nn.Parameter(bias.to(self.compute_dtype), requires_grad=grad)

    # ---------------------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), computed and returned in `compute_dtype`."""
        if self.quant_state is None:
            raise RuntimeError("Linear4bit: this layer is an empty shell (built on the meta device); "
                               "fill it with load_state_dict(...) or set_quantized(...) before calling it")
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return linear_4bit(x, self.weight, self.quant_state, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight reconstructed exactly: (out_features, in_features) in `quant_state.dtype`."""
        if self.quant_state is None:
            raise RuntimeError("Linear4bit.dequantize: the layer is an empty (meta) shell")
        return dequantize_4bit(self.weight.detach(), self.quant_state)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` holding the dequantised weight (default dtype: `quant_state.dtype`).

        Exact: the weight equals `dequantize()` (rounded only if `dtype` is narrower).
        """
        weight = self.dequantize()
        dtype = dtype or weight.dtype
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta", dtype=dtype
        )
        linear.weight = nn.Parameter(weight.to(dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return linear

    def extra_repr(self) -> str:
        f = self.format
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={f.quant_type}, blocksize={f.blocksize}, double_quant={f.double_quant}, "
                f"compute_dtype={f.compute_dtype}")

    # --------------------------------------------------------------------------- device moves
    def _apply(self, fn, recurse: bool = True):
        """Move the packed codes and state with the module, never converting their dtype.

        `fn` is whatever `.to()` / `.cuda()` / `.half()` / `.to_empty()` passes down. The bias
        follows it as usual; for the packed codes only the device it picks is kept (bytes viewed as
        bf16 storage must not be "converted" by `.float()`), and the state follows that device.
        """
        packed = self.weight
        self._parameters["weight"] = None  # nn.Module._apply skips None entries
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = packed
        moved = fn(packed.data)
        if moved.dtype != packed.dtype:
            moved = packed.data.to(moved.device)
        if torch._has_compatible_shallow_copy_type(packed.data, moved):
            packed.data = moved
        else:  # e.g. cpu <-> meta: a new frozen Parameter, as nn.Module._apply does
            self._parameters["weight"] = nn.Parameter(moved, requires_grad=False)
        if self.quant_state is not None and self.quant_state.absmax.device != moved.device:
            self.quant_state = self.quant_state.to(moved.device)
        return self

    # ---------------------------------------------------------------------- state dict (bnb)
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quant_state is not None:
            for key, value in self.quant_state.to_dict(prefix + "weight.").items():
                destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Rebuild packed codes + state from bitsandbytes' layout (works on a meta shell).

        The packed weight and state are always replaced, as with `assign=True` (the checkpoint's
        quantisation config wins; tensors already on this layer's device are used without a copy).
        They go to this layer's device, or stay on the checkpoint's device for a meta shell.
        """
        weight_key = prefix + "weight"
        if weight_key in state_dict:
            self._load_quantized(state_dict, weight_key, error_msgs)
        else:
            missing_keys.append(weight_key)
        bias_key = prefix + "bias"
        if self.bias is not None and bias_key not in state_dict:
            missing_keys.append(bias_key)
        elif bias_key in state_dict:
            self._load_bias(state_dict[bias_key], bias_key, error_msgs)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix) :].split(".")[0] not in ("weight", "bias"):
                    unexpected_keys.append(key)

    def _load_quantized(self, state_dict: dict, weight_key: str, error_msgs: list) -> None:
        sub = weight_key + "."
        parts = {k: v for k, v in state_dict.items() if k.startswith(sub)}
        if not parts:
            error_msgs.append(
                f"{weight_key}: holds an unquantised tensor of shape "
                f"{tuple(state_dict[weight_key].shape)} (no '{sub}*' quantisation state); "
                "Linear4bit loads only 4-bit checkpoints, quantise with Linear4bit.from_linear"
            )
            return
        state = QuantState.from_dict(parts, prefix=sub)
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            error_msgs.append(
                f"size mismatch for {weight_key}: the checkpoint holds a quantised weight of shape "
                f"{tuple(state.shape)}, the shape in the current model is {expected}"
            )
            return
        packed = state_dict[weight_key].detach()
        if self.weight.device.type != "meta":
            packed = packed.to(self.weight.device)
        try:
            _check_packed_size(packed, state, weight_key)
        except UsageError as err:
            error_msgs.append(str(err))
            return
        self.set_quantized(packed, state)

    def _load_bias(self, value: torch.Tensor, key: str, error_msgs: list) -> None:
        if self.bias is None or tuple(value.shape) != (self.out_features,):
            current = "no bias" if self.bias is None else f"({self.out_features},)"
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                f"checkpoint, the shape in the current model is {current}"
            )
            return
        device = value.device if self.bias.device.type == "meta" else self.bias.device
        self._set_bias(value.detach().to(device), key)


def _weight_shape(state: QuantState, where: str) -> tuple[int, int]:
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise UsageError(f"{where}: quant_state.shape={shape}; a linear weight must be 2-D (out, in)")
    return shape


def _check_packed_size(packed: torch.Tensor, state: QuantState, where: str) -> None:
    """The packed tensor must hold exactly ceil(numel/2) bytes of codes for the state's shape."""
    numel = math.prod(state.shape)
    expected_bytes = (numel + 1) // 2
    got_bytes = packed.numel() * packed.element_size()
    if got_bytes != expected_bytes:
        raise UsageError(
            f"{where}: packed weight {tuple(packed.shape)} {packed.dtype} holds {got_bytes} bytes, "
            f"expected {expected_bytes} for a {tuple(state.shape)} weight (two 4-bit codes a byte)"
        )
