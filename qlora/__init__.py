"""qlora: QLoRA fine-tuning with an own NF4 quantiser, bit-exact with bitsandbytes' 4-bit format.

The top level re-exports the public contract lazily, so that `import qlora` (and `qlora --help`)
does not pay for importing torch, transformers or bitsandbytes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "quantize_4bit": "qlora.quant",
    "dequantize_4bit": "qlora.quant",
    "matmul_4bit": "qlora.quant",
    "QuantState": "qlora.quant",
    "bits_per_param": "qlora.quant",
    "Linear4bit": "qlora.nn",
    "LoRALinear": "qlora.nn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
