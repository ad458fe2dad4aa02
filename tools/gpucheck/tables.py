"""The 16-entry 4-bit tables, embedded: the fallback for a GPU image without scipy.

qlora builds the NF4 table from normal quantiles with scipy (`qlora.quant.codebooks`); scipy stays
the source. These are the fp32 values that build gives (and bitsandbytes publishes), written out so
that the check can run where scipy is missing; tests/test_gpu_check.py asserts they equal the
builders' output, bit for bit. FP4 and Int4 need no scipy; they are here so that the preflight can
check the builders on the machine at hand against the same published values.
"""

from __future__ import annotations

import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
       -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
       -0.1666666716337204, -0.25]
INT4 = [1.0, 0.8571428656578064, 0.7142857313156128, 0.5714285969734192, 0.4285714328289032, 0.2857142984867096,
        0.1428571492433548, 0.0, -0.0, -0.1428571492433548, -0.2857142984867096, -0.4285714328289032,
        -0.5714285969734192, -0.7142857313156128, -0.8571428656578064, -1.0]
TABLES = {"nf4": NF4, "fp4": FP4, "int4": INT4}


def embedded(quant_type: str) -> torch.Tensor:
    return torch.tensor(TABLES[quant_type], dtype=torch.float32)


def use_embedded_nf4() -> None:
    """Make `qlora.quant.codebooks` take the embedded NF4 table instead of building it with scipy."""
    from qlora.quant import codebooks

    codebooks.normal_float_levels = lambda offset=codebooks.NF4_OFFSET: embedded("nf4")
    codebooks._cpu_codebook.cache_clear()
    codebooks.sorted_bounds.cache_clear()


def differing_tables() -> list[str]:
    """The quant types whose table as qlora builds it here differs (in any bit) from the embedded one."""
    from qlora.quant.codebooks import codebook

    def bits(t: torch.Tensor) -> list[int]:
        return t.view(torch.int32).tolist()

    return [q for q in TABLES if bits(codebook(q)) != bits(embedded(q))]
