"""Faults injected into test runs through Hydra overrides (``+callbacks.fault._target_=...``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
import torch


class KillAt(pl.Callback):
    """``kill -9`` this process at batch ``batch`` of epoch ``epoch``: no cleanup, no saving."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAt(pl.Callback):
    """Set weights to NaN at batch ``batch`` of epoch ``epoch``.

    ``which="all"`` makes the loss NaN; ``which="first"`` poisons only the first hidden layer's
    first parameter, which silences those neurons (NaN never crosses the threshold) while the loss
    stays finite: only the weights are broken.
    """

    def __init__(self, epoch: int, batch: int = 1, which: str = "all") -> None:
        self.epoch, self.batch, self.which = epoch, batch, which

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            params = list(pl_module.parameters())
            with torch.no_grad():
                for p in params if self.which == "all" else params[:1]:
                    p.fill_(float("nan"))
