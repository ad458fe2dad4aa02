"""The longest sequence that fits a GPU, with and without activation offloading.

`qlora memory MODEL --gpu-gb N --max-seq-len` asks the planner (`plan_memory`) for the largest
`seq_len` whose planned peak fits N GiB, once as the settings are and once with the other value of
`offload_activations` (qlora.training.offload: the checkpointed layers' inputs, c*h bytes per token
per layer, wait in pinned host memory instead). The peak grows with the sequence length (linearly
with SDPA, quadratically with eager attention), so a binary search finds the boundary exactly.
"""

from __future__ import annotations

import dataclasses

from qlora.memory.configs import ModelShape
from qlora.memory.plan import GIB, PlanSettings
from qlora.memory.planner import plan_memory

MAX_TOKENS = 1 << 24  # the search's ceiling (16.8M tokens)


def longest_seq_len(shape: ModelShape, settings: PlanSettings, gpu_bytes: int) -> int:
    """The largest seq_len (at settings.micro_batch) whose plan fits `gpu_bytes`; 0 when none does."""
    def fits(seq: int) -> bool:
        return plan_memory(shape, dataclasses.replace(settings, seq_len=seq, target_tokens=None)).fits(gpu_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, MAX_TOKENS  # fits(lo); hi is the answer or fails
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def longest_sequences(shape: ModelShape, settings: PlanSettings, gpu_bytes: int) -> str:
    """Two lines: the longest sequence without and with activation offloading."""
    lines = []
    for offload in (False, True):
        s = dataclasses.replace(settings, offload_activations=offload)
        seq = longest_seq_len(shape, s, gpu_bytes)
        host = shape.num_hidden_layers * seq * settings.micro_batch * shape.hidden_size * 2 if offload else 0
        how = "with activation offloading" if offload else "without offloading"
        extra = f" (pinned host memory for the layer inputs ~{host / GIB:.1f} GiB)" if offload else ""
        note = "" if s.grad_checkpointing or not offload else " (offloading is planned for checkpointed layers only)"
        lines.append(f"longest sequence that fits {gpu_bytes / GIB:g} GiB at micro-batch {settings.micro_batch}, "
                     f"{how}: {seq:,} tokens{extra}{note}")
    return "\n".join(lines)
