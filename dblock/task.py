"""The LightningModule: loss, metrics, spike counts, epoch time, optimiser and schedule."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


class SNNTask(pl.LightningModule):
    """Trains an ``SNNClassifier`` with cross-entropy, Adam and a step learning-rate schedule.

    Batches are ``(x, y)`` with ``x`` (B, n_in, T) counts and ``y`` (B,) labels. Logs, per stage,
    ``<stage>/loss``, ``<stage>/acc`` and ``<stage>/spikes_per_sample`` (hidden spikes summed
    over hidden layers), and ``train/epoch_time_s`` and ``lr`` each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        n_classes: int,
        lr: float = 1e-3,
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.acc = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes=n_classes, average="micro") for s in STAGES}
        )
        self.epoch_times: list[float] = []
        self._epoch_start = 0.0

    def forward(self, x: Tensor):
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self.model(x)
        loss = F.cross_entropy(out.logits, y)
        acc = self.acc[f"{stage}_acc"]
        acc(out.logits.detach(), y)
        kw = dict(on_step=False, on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **{k: v for k, v in kw.items() if k != "sync_dist"})
        self.log(f"{stage}/spikes_per_sample", out.spikes.float().mean(), **kw)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_times.append(elapsed)
        self.log("train/epoch_time_s", elapsed, sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])

    def mean_epoch_time(self) -> float | None:
        """Mean training epoch time in seconds, the first epoch excluded when there are more."""
        times = self.epoch_times[1:] if len(self.epoch_times) > 1 else self.epoch_times
        return sum(times) / len(times) if times else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_times"] = list(self.epoch_times)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_times = list(checkpoint.get("epoch_times", []))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(self.hparams.milestones), gamma=self.hparams.gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class PaperRecipe(pl.callbacks.ModelCheckpoint):
    """The paper's training recipe (SPEC §5) on top of Lightning's checkpointing.

    Keeps the checkpoint with the lowest ``monitor`` (training loss by default) as
    ``<dirpath>/best-train-loss.ckpt``. At the start of every milestone epoch (the epochs where
    the task's ``MultiStepLR`` has just cut the learning rate) it reloads those weights and
    restarts Adam (its moment estimates and step counts are cleared; the scheduled lr stays).
    When training ends the best weights are loaded back, so the test reports that checkpoint.
    Milestones already applied are part of the callback's checkpoint state (resumable).
    """

    def __init__(
        self,
        milestones: Sequence[int] = (30, 60, 90),
        monitor: str = "train/loss",
        mode: str = "min",
        filename: str = "best-train-loss",
        **kwargs,
    ) -> None:
        kwargs.setdefault("save_on_train_epoch_end", True)
        super().__init__(
            monitor=monitor,
            mode=mode,
            filename=filename,
            save_top_k=1,
            auto_insert_metric_name=False,
            **kwargs,
        )
        self.milestones = sorted(int(m) for m in milestones)
        self.applied: list[int] = []

    def _reload_best(self, trainer: pl.Trainer) -> bool:
        if not self.best_model_path:
            epoch = trainer.current_epoch
            log.warning("recipe: no %s checkpoint (epoch %d); weights kept", self.monitor, epoch)
            return False
        checkpoint = trainer.strategy.load_checkpoint(self.best_model_path)
        trainer.strategy.load_model_state_dict(checkpoint)
        return True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.milestones or epoch in self.applied:
            return
        if self._reload_best(trainer):
            log.info("recipe: epoch %d, reloaded %s (%s=%.4g), Adam restarted", epoch,
                     self.best_model_path, self.monitor, float(self.best_model_score))
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # a fresh Adam: no moments, step counts from zero
        self.applied.append(epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._reload_best(trainer):
            log.info("recipe: reporting %s (%s=%.4g)", self.best_model_path, self.monitor,
                     float(self.best_model_score))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "milestones_applied": list(self.applied)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.applied = list(state_dict.get("milestones_applied", []))
