"""What a run shows: one line per epoch when stdout is not a terminal, a bar when it is.

``progress_bar`` is the ``callbacks.progress`` entry (conf/callbacks/default.yaml).
``ConsoleFormatter`` formats the console handler of the run's logging (conf/hydra/default.yaml):
bare messages, ``warning: ...`` and ``error: ...`` prefixes. ``silence_library_noise`` turns off
the warnings a user cannot act on. Lightning's own info lines (GPU/TPU available, tips) are
turned down in the logging config, where the run's other loggers are set.
"""

from __future__ import annotations

import logging
import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

# records for the run's log file only (the console shows a bar instead); set up in
# conf/hydra/default.yaml as a logger with only the file handler
file_log = logging.getLogger("dblock.logfile")

log = logging.getLogger("dblock.progress")



_job_label: list[str] = [""]  # set per job by run.py when jobs run in parallel


def epoch_line(trainer: pl.Trainer, seconds: float) -> str:
    """``epoch 3/20: train/loss 0.1234, train/acc 0.9600, val/loss ..., val/acc ... (0.91 s)``."""
    metrics = trainer.progress_bar_metrics
    keys = sorted(  # train before val, loss before acc
        (k for k in metrics if "/" in k),
        key=lambda k: (not k.startswith("train"), "loss" not in k, k),
    )
    values = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in keys)
    total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
    width = len(str(total))
    return f"epoch {trainer.current_epoch + 1:>{width}}/{total}: {values} ({seconds:.2f} s)"


class EpochLines(ProgressBar):
    """A progress display of one logged line per training epoch (for logs and pipes)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self._start = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            log.info(epoch_line(trainer, time.perf_counter() - self._start))


class EpochBar(TQDMProgressBar):
    """Lightning's bar on a terminal; the run's log file still gets one line per epoch."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.is_global_zero:
            file_log.info(epoch_line(trainer, time.perf_counter() - self._start))


def progress_bar(refresh_rate: int = 5, terminal: bool | None = None) -> ProgressBar:
    """The bar when stdout is a terminal (``terminal=None``: ask stdout), else ``EpochLines``."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    return EpochBar(refresh_rate) if terminal else EpochLines()
