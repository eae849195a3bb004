"""Training progress a user can watch in a log file: plain lines with throughput and ETA.

Long runs go to the background (``nohup hiseg train ... > train.log``), where a progress bar draws
nothing. :class:`ProgressLog` prints one line every N steps and at least once a minute, and the
per-level val scores at each epoch's end. Throughput and ETA are measured from the moment this
process started training, so a ``--resume``d run reports its own speed, never "0.0 img/s".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def use_progress_bar(setting: bool | str) -> bool:
    """``auto``: a live bar on a terminal, plain log lines otherwise (files, nohup, CI)."""
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


def format_duration(seconds: float) -> str:
    """``1:02:03``-style, whole seconds; ``?`` while unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, infinite
        return "?"
    return str(timedelta(seconds=round(seconds)))


class ProgressLog(Callback):
    """One plain line every ``every_n_steps`` optimiser steps and at least every ``interval_s``
    seconds: epoch, step / total, loss, img/s over the last interval, ETA of the epoch and the run.

    The run's ETA counts the remaining steps at the speed measured since this process began
    training, plus the last validation's duration for each epoch still to come.
    """

    def __init__(
        self,
        every_n_steps: int,
        interval_s: float = 60.0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.every_n_steps = max(1, every_n_steps)
        self.interval_s = interval_s
        self.write = write or (lambda line: print(line, flush=True))
        self.clock = clock
        self.start_time = self.last_time = self.val_start = 0.0
        self.start_step = self.last_images = self.images = 0
        self.val_seconds = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_time = self.last_time = self.clock()
        self.start_step = trainer.global_step
        self.images = self.last_images = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.images += len(batch[0]) * trainer.world_size
        now = self.clock()
        due = trainer.global_step % self.every_n_steps == 0
        if not trainer.is_global_zero or not (due or now - self.last_time >= self.interval_s):
            return
        self.write(self.line(trainer, batch_idx, now))
        self.last_time, self.last_images = now, self.images

    def line(self, trainer: L.Trainer, batch_idx: int, now: float) -> str:
        rate = (self.images - self.last_images) / max(now - self.last_time, 1e-9)
        steps_done = trainer.global_step - self.start_step
        step_time = (now - self.start_time) / max(steps_done, 1)
        per_epoch = _num_batches(trainer)
        epoch_left = max(per_epoch - batch_idx - 1, 0) * step_time if per_epoch else float("nan")
        total = int(trainer.estimated_stepping_batches)
        epochs_left = max((trainer.max_epochs or 0) - trainer.current_epoch, 0)
        run_left = max(total - trainer.global_step, 0) * step_time + epochs_left * self.val_seconds
        loss = trainer.callback_metrics.get("train/loss_step")
        loss_text = f"{float(loss):.4f}" if loss is not None else "?"
        return (
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
            f"step {trainer.global_step}/{total} (batch {batch_idx + 1}/{per_epoch or '?'}) "
            f"loss {loss_text} {rate:.1f} img/s "
            f"ETA epoch {format_duration(epoch_left)} run {format_duration(run_left)}"
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_start = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_seconds = self.clock() - self.val_start
        self.last_time = self.clock()  # validation time is not training throughput
        self.last_images = self.images
        if trainer.is_global_zero:
            self.write(epoch_summary(trainer, self.val_seconds))


def epoch_summary(trainer: L.Trainer, val_seconds: float) -> str:
    """``epoch 3/9 val: miou0 0.81 miou1 0.66 miou2 0.49 (val 1:02) checkpoints: <folder>``."""
    metrics: dict[str, Any] = trainer.callback_metrics
    scores = " ".join(
        f"{key.split('/')[1]} {float(value):.4f}"
        for key, value in sorted(metrics.items())
        if key.startswith("val/miou") or key == "val/score"
    )
    folder = trainer.default_root_dir
    return (
        f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} val: {scores or 'no scores'} "
        f"(val {format_duration(val_seconds)}) checkpoints: {folder}"
    )


def _num_batches(trainer: L.Trainer) -> int:
    n = trainer.num_training_batches
    return int(n) if n != float("inf") else 0
