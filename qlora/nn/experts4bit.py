"""`Experts4bit`: the experts of one fused 3-D parameter, each frozen in its own 4-bit quantisation.

transformers 5 keeps a mixture-of-experts layer's weights in fused 3-D parameters, e.g. Mixtral's
``experts.gate_up_proj`` (E, 2*I, H) and ``experts.down_proj`` (E, H, I). bitsandbytes replaces
only `nn.Linear`, so those stay 16-bit. Here each expert matrix W_e (out, in) is quantised on its
own, exactly as `Linear4bit` quantises a linear weight, so its codes, absmax and nested constants
are the bytes bitsandbytes' ``quantize_4bit(W_e)`` writes. The E quantisations of one parameter
live in one buffer per field:

    packed        (E, out*in/2)    uint8, two codes a byte
    absmax        (E, blocks)      uint8 codes of absmax - offset (double quant) or fp32
    nested_absmax (E, blocks/256)  fp32 scale per 256 constants (double quant)
    offset        (E,)             fp32 mean absmax of each expert (double quant)

so the store costs 4.127 bits per weight at block 64, like a `Linear4bit`. A layout with the
weight stored transposed (gpt-oss: (E, in, out)) is quantised in nn.Linear orientation, W_e =
stored_e.T, so every expert here is (out, in) and ``x @ W_e.T`` is one `linear_4bit` call.

`linear(x, e)` runs expert e's tokens through `qlora.nn.linear4bit.linear_4bit`: the forward
decodes W_e into the shared workspace and drops it, the backward decodes it again (nothing
dequantised is saved), and the decoding goes through the one dispatch of `qlora.quant.backends`,
so the native and Triton kernels serve experts as they serve linears. Only experts that received
tokens are decoded: `decoded` counts the expert matrices decoded by forwards (a test and the
benchmark read it), so the decoded bytes per layer grow with the routed experts, not with E.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.nn.linear4bit import linear_4bit, quantize_format
from qlora.quant import QuantState
from qlora.quant.format import QuantFormat
from qlora.quant.state import NestedState


class Experts4bit(nn.Module):
    """E frozen 4-bit matrices of shape (out_features, in_features), filled one expert at a time.

    Build it empty (zeros) with the layer's shape and a `QuantFormat`, then `set_expert(e, W_e)` for
    every expert as its checkpoint tensor arrives; `quantize(stack, fmt)` does all at once.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, fmt: QuantFormat = QuantFormat(),
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features, self.format = num_experts, out_features, in_features, fmt
        numel = out_features * in_features
        blocks = -(-numel // fmt.blocksize)
        scale_dtype = torch.uint8 if fmt.double_quant else torch.float32
        self.register_buffer("packed", torch.zeros(num_experts, (numel + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(num_experts, blocks, dtype=scale_dtype, device=device))
        self.register_buffer("code", torch.zeros(16, dtype=torch.float32, device=device))
        if fmt.double_quant:
            self.register_buffer("nested_absmax", torch.zeros(num_experts, -(-blocks // 256), device=device))
            self.register_buffer("offset", torch.zeros(num_experts, device=device))
            self.register_buffer("nested_code", torch.zeros(256, device=device))
        self.filled = [False] * num_experts
        self.decoded = 0
        self._states: list[QuantState] | None = None

    @classmethod
    def quantize(cls, stack: torch.Tensor, fmt: QuantFormat) -> "Experts4bit":
        """Quantise a (E, out, in) stack expert by expert."""
        store = cls(stack.shape[0], stack.shape[1], stack.shape[2], fmt, device=stack.device)
        for e in range(stack.shape[0]):
            store.set_expert(e, stack[e])
        return store

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    def set_expert(self, e: int, weight: torch.Tensor) -> None:
        """Quantise expert ``e``'s (out, in) weight into its slots (the 16-bit tensor is not kept)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise UsageError(f"expert {e} has shape {tuple(weight.shape)}; its layer expects "
                             f"{(self.out_features, self.in_features)}")
        fmt = self.format
        packed, state = quantize_format(weight.to(fmt.compute_dtype), replace(fmt, quant_storage=torch.uint8))
        with torch.no_grad():
            self.packed[e].copy_(packed.view(torch.uint8).view(-1))
            self.absmax[e].copy_(state.absmax)
            self.code.copy_(state.code)
            if state.state2 is not None:
                self.nested_absmax[e].copy_(state.state2.absmax)
                self.offset[e].copy_(state.state2.offset)
                self.nested_code.copy_(state.state2.code)
        self.filled[e] = True
        self._states = None

    def state(self, e: int) -> QuantState:
        """Expert ``e``'s `QuantState`: views into the shared buffers (built once, reused)."""
        if self._states is None:
            self._states = [self._make_state(i) for i in range(self.num_experts)]
        return self._states[e]

    def _make_state(self, e: int) -> QuantState:
        fmt = self.format
        nested = None
        if fmt.double_quant:
            nested = NestedState(self.nested_absmax[e], self.nested_code, self.offset[e], 256)
        return QuantState(self.absmax[e], torch.Size((self.out_features, self.in_features)), fmt.compute_dtype,
                          fmt.blocksize, fmt.quant_type, self.code, nested)

    def packed_of(self, e: int) -> torch.Tensor:
        """Expert ``e``'s packed codes in `Linear4bit`'s shape ((n+1)//2, 1)."""
        return self.packed[e].unsqueeze(1)

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e.T in x's dtype (differentiable in x), decoding W_e on the fly."""
        self.decoded += 1
        return linear_4bit(x.to(self.format.compute_dtype), self.packed_of(e), self.state(e))

    def dequantize(self, e: int | None = None) -> torch.Tensor:
        """W_e (out, in), or the whole (E, out, in) stack, in the compute dtype."""
        from qlora.quant import dequantize_4bit

        if e is not None:
            return dequantize_4bit(self.packed_of(e), self.state(e))
        return torch.stack([self.dequantize(i) for i in range(self.num_experts)])

    @property
    def bits_per_weight(self) -> float:
        nbytes = sum(b.numel() * b.element_size() for name, b in self.named_buffers() if "code" not in name)
        return 8 * nbytes / math.prod(self.shape)

    def _apply(self, fn, recurse: bool = True):
        """Moves keep every dtype (the bytes are codes; scales stay fp32), as `Linear4bit` does."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved.to(buf.dtype) if moved.dtype != buf.dtype else moved
        self._states = None
        return self

    def extra_repr(self) -> str:
        f = self.format
        return (f"experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
                f"{f.quant_type}, blocksize={f.blocksize}, double_quant={f.double_quant}")
