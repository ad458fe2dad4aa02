"""Progress of the long byte-bound jobs (stream-loading, quantising, merging, writing): tqdm bars in
bytes and bytes/s on stderr.

A 65B load reads ~130 GB and takes minutes; a bar says it is moving and how fast. Bars appear only
when stderr is a terminal (tqdm's ``disable=None``), so logs, pipes, CI and pytest's captured
output get none; ``TQDM_DISABLE=1`` (tqdm's own switch, any non-empty value) hides them on a
terminal too. Under torchrun only rank 0 draws (every rank loads the same files). Bars are
transient (``leave=False``): the commands print their own one-line result.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

from qlora.runtime import process_rank


def byte_bar(total: int, desc: str) -> tqdm:
    """A bar over ``total`` bytes; ``update(n)`` after each ``n`` bytes read, converted or written."""
    off = bool(os.environ.get("TQDM_DISABLE")) or process_rank() != 0  # tqdm reads it only when
    # `disable` is not passed, and None means "when stderr is not a terminal"
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=True if off else None, leave=False, dynamic_ncols=True)
