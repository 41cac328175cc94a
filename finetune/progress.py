"""What a training run shows while it trains: one line per epoch, and a tqdm bar within the epoch on a terminal.

A bar redraws itself with carriage returns: written to a file or a CI log, it becomes a wall of them. So bars are
drawn only when both output streams are terminals, and the line each epoch ends with (on the main process, bars or
not) is what a log keeps: the handful of metrics that say how training goes; `metrics.jsonl` holds them all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

# An epoch line's training metrics, where the task logs them: the last log interval's means.
TRAIN_METRICS = ("loss", "ce", "kd", "imitation")
TARGET_PREFIX = "target_"  # `target_macs` with `val_macs` shows as macs/target: the evaluated architecture's
STATE_METRICS = ("lambda",)
VAL_METRICS = ("val_acc1", "best_acc1")


def is_terminal() -> bool:
    """Whether stdout and stderr (where tqdm draws) are both terminals."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


class EpochProgress:
    """The bars and lines of one training run; `show` on the main process only, bars with `bars` on a terminal."""

    def __init__(self, epochs: int, show: bool, bars: bool) -> None:
        self.epochs = epochs
        self.show = show
        self.bars = show and bars and is_terminal()
        self._bar: tqdm | None = None
        self._started = time.perf_counter()
        self._train: dict[str, Any] = {}  # the epoch's last training record

    def epoch(self, batches: Iterable[Any], epoch: int, total: int, done: int) -> Iterable[Any]:
        """`batches` (the `done` of `total` already trained left out), with the epoch's bar where bars are drawn."""
        self._started, self._train = time.perf_counter(), {}
        self._bar = tqdm(
            batches, total=total, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.bars,
            leave=False,
        )  # fmt: skip
        return self._bar  # it closes itself when the epoch's batches run out

    def interval(self, metrics: dict[str, Any]) -> None:
        """A log interval's metrics: the first few on the bar."""
        self._train = metrics
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:4]})

    def end_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's validation record: print its line."""
        if self.show:
            print(epoch_line(self._train, record, self.epochs, time.perf_counter() - self._started), flush=True)


def epoch_line(train: dict[str, Any], val: dict[str, Any], epochs: int, seconds: float) -> str:
    """E.g. `epoch 3/10  step 120  loss 1.234  ce 1.1  macs/target 0.98  lambda 0.5  val_acc1 71.2  12.3s`."""
    parts = [f"epoch {val['epoch'] + 1}/{epochs}", f"step {val['step']}"]
    parts += [f"{k} {train[k]:.4g}" for k in TRAIN_METRICS if k in train]
    for key, target in train.items():
        name = key.removeprefix(TARGET_PREFIX)
        if key.startswith(TARGET_PREFIX) and f"val_{name}" in val and target:
            parts.append(f"{name}/target {val[f'val_{name}'] / target:.3f}")
    parts += [f"{k} {train[k]:.4g}" for k in STATE_METRICS if k in train]
    parts += [f"{k} {val[k]:.4g}" for k in VAL_METRICS if k in val]
    return "  ".join([*parts, f"{seconds:.1f}s"])
