"""The LightningModule: one SNN classifier, cross-entropy, Adam with step decay, metrics and
spike counts per stage (docs/model.md §4-5).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dblock.errors import NonFiniteError
from dblock.functional.precision import check_matmul_precision, set_cuda_matmul_precision
from dblock.training.recipe import rng_state, set_rng_state

STAGES = ("train", "val", "test")


class SNNTask(pl.LightningModule):
    """Trains an ``SNNClassifier`` with cross-entropy, Adam and a step learning-rate schedule.

    Batches are ``(x, y)`` with ``x`` time-major (T, B, n_in) counts and ``y`` (B,) labels. Logs,
    per stage, ``<stage>/loss``, ``<stage>/acc``, ``<stage>/spikes_per_sample`` (hidden spikes
    summed over hidden layers) and ``<stage>/samples``, and ``train/epoch_time_s`` and ``lr``
    each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        n_classes: int,
        lr: float = 1e-3,
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
        matmul_precision: str = "highest",
    ) -> None:
        super().__init__()
        check_matmul_precision(matmul_precision)
        self.save_hyperparameters(ignore=["model"])
        self.matmul_precision = matmul_precision
        self._restore_matmuls = None
        self.model = model
        # validate_args=False: the check reads the targets on the host (torch.unique in some
        # torchmetrics versions), a device sync in every step; the labels come from the store
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(
                    num_classes=n_classes, average="micro", validate_args=False
                )
                for s in STAGES
            }
        )
        for s in STAGES:  # NaN kept: a non-finite loss must show (nan_strategy="disable")
            self.acc[f"{s}_loss"] = MeanMetric(nan_strategy="disable")
            self.acc[f"{s}_spikes"] = MeanMetric(nan_strategy="disable")
        self.epoch_times: list[float] = []
        self.samples = dict.fromkeys(STAGES, 0)  # samples seen this epoch, counted on the host
        self._epoch_start = 0.0
        # the run's model and dataset config (plain types), stored in every checkpoint so that a
        # resume or an evaluation can refuse a checkpoint written for another model or data
        self.run_config: dict | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None,
                             strict=None, weights_only=True, **kwargs):
        """The task of a ``run.py`` checkpoint, its network rebuilt from the settings the
        checkpoint stores (``dblock.load_model``) unless ``model=`` is given. Loaded with
        ``weights_only=True``. For inference alone, ``dblock.load_model(path)`` is simpler."""
        if "model" not in kwargs:
            from dblock.load import load_model

            kwargs["model"] = load_model(checkpoint_path)
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
        )

    def forward(self, x: Tensor):
        """``self.model(x)``: ``Output(logits (B, C), spikes (B,))`` of ``x`` (T, B, n_in)."""
        return self.model(x)

    def setup(self, stage: str) -> None:
        """CUDA's float32 matmuls as ``matmul_precision`` says (``high``: TF32 projections, a
        numerics choice; ``highest``, the default: IEEE float32), until ``teardown``."""
        if self._restore_matmuls is None and self.matmul_precision != "highest":
            self._restore_matmuls = set_cuda_matmul_precision(self.matmul_precision)

    def teardown(self, stage: str) -> None:
        if self._restore_matmuls is not None:
            self._restore_matmuls()
            self._restore_matmuls = None

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self.model(x)
        losses = F.cross_entropy(out.logits, y, reduction="none")  # (B,)
        loss = losses.mean()
        # torchmetrics objects reduce exactly over processes, also for shards of unequal size
        acc, mean_loss, spikes = (self.acc[f"{stage}_{m}"] for m in ("acc", "loss", "spikes"))
        # No host sync in a step: the metrics accumulate on the device and are read once per
        # epoch (update, not forward: no per-batch value is computed), and nothing logged here
        # is a Python number (Lightning would copy it to the device, a blocking copy on a GPU).
        acc.update(out.logits.detach(), y)
        mean_loss.update(losses.detach())
        spikes.update(out.spikes.float())
        kw = dict(on_step=False, on_epoch=True, batch_size=y.shape[0])
        self.log(f"{stage}/loss", mean_loss, prog_bar=True, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **kw)
        self.log(f"{stage}/spikes_per_sample", spikes, **kw)
        self.samples[stage] += y.shape[0]
        return loss

    def _log_samples(self, stage: str) -> None:
        """``<stage>/samples``: the epoch's samples, summed over processes (each test sample is
        counted exactly once); logged once per epoch from the host count."""
        n, self.samples[stage] = self.samples[stage], 0
        self.log(f"{stage}/samples", float(n), reduce_fx="sum", sync_dist=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self.samples["train"] = 0
        self._epoch_start = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self.samples["val"] = 0

    def on_test_epoch_start(self) -> None:
        self.samples["test"] = 0

    def on_validation_epoch_end(self) -> None:
        self._log_samples("val")

    def on_test_epoch_end(self) -> None:
        self._log_samples("test")

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint callbacks: a bad epoch stops here and writes nothing. The
        # epoch's mean loss (already reduced over processes, one host sync per epoch) is
        # non-finite if any step's loss was; every process sees the same value and stops.
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None and not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"non-finite training loss in epoch {self.current_epoch}; the run stops and keeps "
                "the checkpoints of the last good epoch (try a lower task.lr)"
            )
        elapsed = time.perf_counter() - self._epoch_start
        self._log_samples("train")
        self.epoch_times.append(elapsed)
        self.log("train/epoch_time_s", elapsed, sync_dist=True)
        # the same on every process: synced only so that DDP has nothing to warn about
        self.log("lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)

    def mean_epoch_time(self) -> float | None:
        """Mean training epoch time in seconds, the first epoch excluded when there are more."""
        times = self.epoch_times[1:] if len(self.epoch_times) > 1 else self.epoch_times
        return sum(times) / len(times) if times else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [
            k
            for k, v in checkpoint["state_dict"].items()
            if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:  # never overwrite a good checkpoint with broken weights
            raise NonFiniteError(
                f"non-finite weights in {', '.join(bad[:3])} at epoch {self.current_epoch}; the "
                "run stops and keeps the checkpoints of the last good epoch (try a lower task.lr)"
            )
        checkpoint["epoch_times"] = list(self.epoch_times)
        # this epoch's training row of the metric logs, which loggers get only after the
        # checkpoints are written: a run killed in between gets it back on resume (metrics_log)
        checkpoint["epoch_log"] = {
            "epoch": self.current_epoch,
            "step": self.trainer.global_step - 1,
            **{
                k: float(v)
                for k, v in self.trainer.callback_metrics.items()
                if k.startswith("train/") or k == "lr"
            },
        }
        checkpoint["rng"] = rng_state()
        if self.run_config is not None:
            checkpoint["dblock_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_times = list(checkpoint.get("epoch_times", []))
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(self.hparams.milestones), gamma=self.hparams.gamma
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
