"""What a user watches while a run trains or evaluates: a bar on a terminal, plain lines elsewhere.

The per-step loss of a small batch jumps (0.0050 -> 0.0038 -> 3.1649 on consecutive steps is
ordinary with short chat rows), so the display shows an exponential moving average beside it,
with the bias correction of Adam's moments so the first steps are not pulled towards zero:

    m_t = beta * m_{t-1} + (1 - beta) * loss_t,    smoothed_t = m_t / (1 - beta^t),   beta = 0.9

(about the last 10 logged steps; HF's and Unsloth's trainers show a running mean for the same
reason). `ema` is that one function; `qlora plot` draws the same curve over the raw one. The
remaining time is the median of the recent step times (eval and checkpoint steps are outliers the
median ignores) times the steps left, not tqdm's rate, which an evaluation throws off for a while.

On a terminal (stderr is a TTY and TQDM_DISABLE unset) a tqdm bar shows step, smoothed and raw
loss, lr, epoch, tokens/s and the ETA; otherwise (logs, CI, pipes) one plain line is printed on
stderr every `train.log_every` steps, so a log shows progress too. `EvalProgress` does the same
for `qlora eval`'s batches.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Iterable, TextIO

from tqdm.auto import tqdm

BETA = 0.9
RECENT = 50  # step times the ETA's median is taken over
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class Ema:
    """The bias-corrected moving average above, one value at a time (non-finite values skipped)."""

    def __init__(self, beta: float = BETA) -> None:
        self.beta, self.m, self.n = beta, 0.0, 0

    def __call__(self, value: float) -> float:
        if math.isfinite(value):
            self.n, self.m = self.n + 1, self.beta * self.m + (1 - self.beta) * value
        return self.m / (1 - self.beta ** self.n) if self.n else math.nan


def ema(values: Iterable[float], beta: float = BETA) -> list[float]:
    """`Ema` over a whole series (the smoothed curve of `qlora plot`)."""
    smooth = Ema(beta)
    return [smooth(v) for v in values]


def duration(seconds: float) -> str:
    """`1h02m`, `3m20s`, `45s`."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def use_bar(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("TQDM_DISABLE")


class TrainDisplay:
    """Progress of the training loop (main process only; `enabled=False` prints nothing)."""

    def __init__(self, total: int, initial: int, steps_per_epoch: int, log_every: int, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.step, self.steps_per_epoch, self.log_every = total, initial, steps_per_epoch, log_every
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream,
                        bar_format=BAR_FORMAT, dynamic_ncols=True) if enabled and use_bar(self.stream) else None
        self.smooth, self.times, self.last = Ema(), [], time.perf_counter()

    def update(self, n: int = 1) -> None:
        """One optimiser step done (its time is the time since the previous one)."""
        now = time.perf_counter()
        self.times = (self.times + [now - self.last])[-RECENT:]
        self.last, self.step = now, self.step + n
        if self.bar is not None:
            self.bar.update(n)

    def eta(self) -> float:
        return statistics.median(self.times) * (self.total - self.step) if self.times else 0.0

    def log(self, record: dict) -> None:
        """A logged step's record (`qlora.training.metrics`): show it."""
        smoothed = self.smooth(record["loss"])
        if not self.enabled:
            return
        epoch = record["step"] / self.steps_per_epoch
        fields = {"loss": f"{smoothed:.4f}", "raw": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                  "epoch": f"{epoch:.2f}", "tok/s": f"{record['tokens_per_s']:.0f}", "eta": duration(self.eta())}
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            return
        print(f"step {record['step']}/{self.total}: loss {fields['loss']} (this step {fields['raw']}), "
              f"lr {fields['lr']}, epoch {fields['epoch']}, {fields['tok/s']} tokens/s, ETA {fields['eta']}"
              f"{' (skipped: non-finite gradients)' if record.get('skipped') else ''}",
              file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """Print a line (an evaluation's) without breaking the bar."""
        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EvalProgress:
    """Progress over an evaluation's micro-batches: a bar on a terminal, else a line at every
    tenth of them (`qlora eval`)."""

    def __init__(self, total: int, desc: str = "eval", stream: TextIO | None = None) -> None:
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.t0, self.tokens = time.perf_counter(), 0
        self.bar = tqdm(total=total, desc=desc, unit="batch", file=self.stream, leave=False,
                        dynamic_ncols=True) if use_bar(self.stream) else None
        self.every = max(1, total // 10)

    def __call__(self, done: int, tokens: int) -> None:
        """`done` batches with `tokens` target tokens so far."""
        self.tokens = tokens
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(tokens=tokens, refresh=False)
        elif done % self.every == 0 or done == self.total:
            print(f"{self.desc}: {done}/{self.total} batches, {tokens} tokens, "
                  f"{duration(time.perf_counter() - self.t0)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
