"""`QuantState`: everything needed to turn packed 4-bit codes back into a tensor.

Layout (bitsandbytes 0.50.x, so checkpoints move both ways):

- `absmax`: one scale per block of `blocksize` elements. Without double quantisation these are the
  fp32 absmax values. With it they are uint8 codes of `absmax - offset` in the signed 8-bit dynamic
  map, one fp32 scale per 256 constants in `state2.absmax`, and the scalar fp32 `offset` (the mean
  absmax, subtracted because absmax values are all positive and would waste the sign bit).
- `code`: the 16-entry fp32 table (`quant_map` in a state dict); `state2.code` the 256-entry map.

Serialised, a Linear4bit weight with prefix `weight.` becomes the tensors `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
`weight.quant_state.bitsandbytes__<type>`: UTF-8 JSON bytes as a uint8 tensor holding the
non-tensor fields (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype,
nested_offset). That JSON is what makes the format safetensors-friendly.

Bits per parameter at block 64 with double quantisation: 4 (the code) + 8/64 (a uint8 absmax code per
block) + 32/(64*256) (an fp32 scale per 256 blocks) = 4.127.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from qlora.dtypes import from_hf_name, hf_name

_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass
class NestedState:
    """The 8-bit blockwise quantisation of the absmax constants (double quantisation)."""

    absmax: torch.Tensor  # fp32, one per `blocksize` constants
    code: torch.Tensor  # fp32 (256,), the signed dynamic map
    offset: torch.Tensor  # fp32 scalar, mean of the original absmax
    blocksize: int = 256


@dataclass
class QuantState:
    """Scales and metadata of one 4-bit quantised tensor (see module docstring)."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    state2: NestedState | None = field(default=None)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def offset(self) -> torch.Tensor | None:
        return None if self.state2 is None else self.state2.offset

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy of this state with its tensors on `device` (states are small)."""
        state2 = None
        if self.state2 is not None:
            s = self.state2
            state2 = NestedState(s.absmax.to(device), s.code.to(device), s.offset.to(device), s.blocksize)
        return QuantState(self.absmax.to(device), self.shape, self.dtype, self.blocksize, self.quant_type,
                          self.code.to(device), state2)

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' Linear4bit state-dict layout, keys prefixed with `prefix`."""
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": hf_name(self.dtype),
            "shape": list(self.shape),
        }
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.state2 is not None:
            tensors["nested_absmax"] = self.state2.absmax
            tensors["nested_quant_map"] = self.state2.code.clone()
            meta.update(nested_blocksize=self.state2.blocksize, nested_dtype="float32",
                        nested_offset=self.state2.offset.item())
        packed = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out = {prefix + k: v for k, v in tensors.items()}
        out[f"{prefix}quant_state.bitsandbytes__{self.quant_type}"] = packed
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "",
                  device: torch.device | str | None = None) -> "QuantState":
        """Rebuild a state from `to_dict` output (or a bitsandbytes/transformers checkpoint)."""
        meta_keys = [k for k in tensors if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise ValueError(f"expected exactly one '{prefix}quant_state.bitsandbytes__<type>' entry, "
                             f"found {meta_keys or 'none'}")
        meta = json.loads(bytes(tensors[meta_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        missing = [prefix + k for k in ("absmax", "quant_map") if prefix + k not in tensors]
        if "nested_blocksize" in meta:
            missing += [prefix + k for k in ("nested_absmax", "nested_quant_map") if prefix + k not in tensors]
        if missing:
            raise ValueError(f"quantisation state is missing {missing}")
        try:
            dtype = from_hf_name(meta.get("dtype"))
        except ValueError as err:
            raise ValueError(f"{meta_keys[0]}: {err}") from None

        def get(key: str) -> torch.Tensor:
            t = tensors[prefix + key]
            return t if device is None else t.to(device)

        state2 = None
        if "nested_blocksize" in meta:
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32,
                                  device=get("nested_absmax").device)
            state2 = NestedState(get("nested_absmax"), get("nested_quant_map"), offset, int(meta["nested_blocksize"]))
        return cls(absmax=get("absmax"), shape=torch.Size(meta["shape"]), dtype=dtype,
                   blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"], code=get("quant_map"),
                   state2=state2)


def state_nbytes(state: QuantState) -> int:
    """Bytes of the quantisation constants (excluding the packed codes themselves)."""
    total = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
    if state.state2 is not None:
        total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4 + 4
    return total


def bits_per_param(state: QuantState, include_tables: bool = False) -> float:
    """Storage cost in bits per quantised element: 4 for the code plus the scales.

    With `include_tables=False` (the usual way the figure is quoted) the fixed per-tensor tables
    (16 + 256 fp32 values and the offset) are left out: they do not scale with the tensor.
    """
    n = state.numel
    scale_bits = state.absmax.numel() * state.absmax.element_size() * 8
    if state.state2 is not None:
        scale_bits += state.state2.absmax.numel() * 32
    table_bits = (state_nbytes(state) * 8 - scale_bits) if include_tables else 0
    return (4 * n + 4 * (n % 2) + scale_bits + table_bits) / n
