"""The NF4 / FP4 / Int4 quantiser: codebooks, blockwise 4-bit (de)quantisation with double
quantisation of the scales, the bitsandbytes-compatible `QuantState`, and a 4-bit matmul."""

from qlora.quant.api import block_scales, dequantize_4bit, matmul_4bit, quantize_4bit
from qlora.quant.codebooks import codebook
from qlora.quant.state import NestedState, QuantState, bits_per_param

__all__ = ["quantize_4bit", "dequantize_4bit", "matmul_4bit", "block_scales", "QuantState", "NestedState",
           "bits_per_param", "codebook"]
