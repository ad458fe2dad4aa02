"""SIGINT / SIGTERM during `qlora train`: finish the step, keep the progress, stop with 130 / 143.

A batch scheduler preempts a job with SIGTERM (and later SIGKILL); a user stops one with Ctrl-C.
Either way the steps since the last checkpoint are worth keeping, so while the loop runs
(`arm`), the first signal only sets a flag. The loop finishes the optimiser step it is in, leaves
its `while`, writes a checkpoint of that step through the usual atomic path
(`qlora.training.checkpoint.save_checkpoint`), and `finish` raises `Interrupted` naming it; the CLI
prints that one line and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
`--resume` continues from it exactly like from any checkpoint (same batches, same dropout masks),
so the resumed run ends with the bytes of an uninterrupted one (tools/chaos.py's trial).

A second signal means "now": the handler raises at once, wherever the main thread is. During the
checkpoint write that unwinds `atomic_folder`, which deletes its temporary folder, so the previous
checkpoint is the newest complete one and stays untouched. Outside the loop (loading, the final
evaluation and save) the first signal already raises: there is no step to finish, and the lock is
released on the way out.

Under DDP every process gets the signal at its own moment; `pending` takes the maximum of the
flags over processes (one small all-reduce per step), so all of them save the same step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from qlora.errors import Interrupted
from qlora.run_dir import CHECKPOINTS

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Signal handlers for one training run; use as a context manager around it."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received while armed
        self.agreed = False  # every process knows of a stop (set by `pending`)
        self.armed = False
        self.run_dir: Path | None = None  # named in the line of a second signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.armed and self.signum is None:
            self.signum = signum  # the loop finishes its step and saves
            return
        kept = sorted((self.run_dir / CHECKPOINTS).glob("step-*")) if self.run_dir else []
        newest = f"; the newest complete checkpoint is {kept[-1]}" if kept else ""
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}: stopped at once{newest}")

    def arm(self, run_dir: Path) -> None:
        """From now on the first signal asks the loop to stop after its step."""
        self.armed, self.run_dir = True, Path(run_dir)

    def pending(self, rt) -> bool:
        """True when a stop was asked for, on any process; every process calls it once per step."""
        if rt.distributed:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(self.signum or 0)], device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = self.signum or int(flag.item()) or None
        self.agreed = self.signum is not None
        return self.agreed

    def finish(self, step: int, checkpoint: Path | None) -> None:
        """After the loop: raise `Interrupted` naming the checkpoint of `step` when a stop was asked."""
        self.armed = False
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        if checkpoint is not None and checkpoint.is_dir():
            raise Interrupted(self.signum, f"interrupted by {name} after step {step}; checkpoint {checkpoint} "
                                           "written (continue with --resume)")
        raise Interrupted(self.signum, f"interrupted by {name} after step {step}; no checkpoint of this step "
                                       "could be written (non-finite weights); --resume takes the newest one")
