"""The sections, in run order: one `Section` each. To add one, write `def my_section(ctx) -> list[Row]`
and append `Section("name", my_section, needs=(...))` here; `--sections name` then runs it.

`needs` names preflight items (gpucheck.preflight) without which the section cannot run at all: it
then gives one skipped row (ok None) with the missing item's detail. Items that only change how a
section runs (no accelerate: the meta device; no bitsandbytes: qlora's AdamW) are not needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gpucheck import moe_sections, quant_sections, train_sections
from gpucheck.common import Context, Row


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Context], list[Row]]
    needs: tuple[str, ...] = ()
    cuda_needs: tuple[str, ...] = ()  # needed on CUDA only (on CPU the native kernels stand in)


SECTIONS = [
    Section("exact", quant_sections.exactness),
    Section("bnb", quant_sections.versus_bitsandbytes, needs=("bitsandbytes",)),
    Section("speed", quant_sections.speed, cuda_needs=("triton",)),
    Section("step", train_sections.training_step, needs=("transformers",)),
    Section("65b", train_sections.headline_65b, needs=("transformers",)),
    Section("moe", moe_sections.expert_layer, needs=("transformers",)),
    Section("moe-step", moe_sections.mixtral_step, needs=("transformers",)),
]


def missing_needs(section: Section, ctx: Context) -> list[str]:
    needs = section.needs + (section.cuda_needs if ctx.cuda else ())
    return [item for item in needs if not ctx.has(item)]
