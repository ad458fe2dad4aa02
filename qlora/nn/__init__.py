"""Layers: `Linear4bit` (a frozen 4-bit linear that dequantises on the fly) and `LoRALinear`
(a low-rank adapter around any linear-like module)."""

from qlora.nn.linear4bit import Linear4bit, linear_4bit
from qlora.nn.lora import LoRALinear

__all__ = ["Linear4bit", "LoRALinear", "linear_4bit"]
