"""The LightningModule: loss, metrics, spike counts, epoch time, optimiser and schedule."""

from __future__ import annotations

import io
import logging
import random
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dblock import runner
from dblock.files import DiskFullError, atomic_write
from dblock.functional.precision import check_matmul_precision, set_cuda_matmul_precision

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; the run must stop."""


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


class CheckpointWriteError(OSError):
    """A file of the run cannot be written (read-only or failing filesystem); the previous
    version of the file is kept. The message names the file, the reason and what to do."""

    def __init__(self, path, err: OSError) -> None:
        self.path = Path(path)
        reason = err.strerror or type(err).__name__
        super().__init__(
            err.errno,
            f"cannot write {self.path} ({reason}); the previous version of the file is kept: "
            "make the run folder writable, or copy the run folder elsewhere (cp -a) and resume "
            "the copy",
        )

    def __str__(self) -> str:
        return self.strerror


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically in their own directory (``dblock.files.atomic_write``).

    Lightning's default stages the file in ``$TMPDIR`` and, when that is another filesystem (a
    local ``$TMPDIR`` with the run dir on NFS or Lustre, or a tmpfs), falls back to truncating the
    target and copying into it: a kill or a full disk then destroys the previous checkpoint. Here
    the temp file sits beside the target, is fsynced and renamed over it, so every checkpoint
    callback (``last``, ``best``, the paper recipe's) leaves either the old or the new file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        # serialised first, as Lightning does: torch.save into a file turns an OSError from the
        # file (ENOSPC) into a RuntimeError, and a full disk must be reported as such
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write(path, lambda f: f.write(buffer.getbuffer()))
        except DiskFullError:
            raise
        except OSError as err:  # EROFS, EIO, EACCES: one line, not a traceback
            raise CheckpointWriteError(path, err) from err

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Any = None) -> dict:
        """Every checkpoint Lightning reads (resume, test, a callback's reload): a local file,
        loaded weights-only (``runner.load_checkpoint``), whatever the caller asked for. A URL
        is refused, never downloaded."""
        return runner.load_checkpoint(path)


class StopTogether(pl.Callback):
    """Under DDP, a stop signal that reaches any one process stops every process at the same
    training batch boundary, as an interrupted single-process run stops.

    Lightning broadcasts rank 0's SIGTERM flag before every training batch, so a signal sent to
    another rank alone stops only that rank (and its handler starts a collective of its own from
    inside the signal handler): rank 0 then dies in the next collective ("Connection closed by
    peer"). Here, during training, the signals are only recorded (``SignalStop.deferred``) and
    that per-batch broadcast becomes an all-reduce (max) of the signal number: every process sees
    the same signal at the same step and raises Lightning's ``SIGTERMException``, and run.py
    writes the interrupted results.json on rank 0. No collective is added.
    """

    def __init__(self, stop: runner.SignalStop) -> None:
        self.stop = stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch.distributed as dist

        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        self.stop.deferred = True
        for signum in (signal.SIGTERM, signal.SIGINT):  # after Lightning registered its own
            if runner._main_thread():
                signal.signal(signum, self.stop._handle)
        loop = trainer.fit_loop.epoch_loop
        loop._broadcast_sigterm_tensor = lambda: self._agree(trainer)  # Lightning's private

    def _agree(self, trainer: pl.Trainer) -> None:
        import torch.distributed as dist
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        flag = torch.tensor([self.stop.signum or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:
            if self.stop.signum is None:
                self.stop.signum = signum  # the signal another process received
            raise SIGTERMException()


def order_checkpoints(callbacks: list) -> list:
    """Checkpoint callbacks with a monitor (best, the paper recipe) before those without (last).

    All of them write at the end of the training epoch, in list order, and each file holds
    every callback's state: ``last.ckpt`` must be written last, so that it records this epoch's
    best score and a resume from it selects exactly as an uninterrupted run would.
    """
    ckpts = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    ordered = iter(
        [c for c in ckpts if c.monitor is not None] + [c for c in ckpts if c.monitor is None]
    )
    return [next(ordered) if isinstance(c, pl.callbacks.ModelCheckpoint) else c for c in callbacks]


class RunCheckpoint(pl.callbacks.ModelCheckpoint):
    """A ``ModelCheckpoint`` whose files are found in its own ``dirpath``, never where a
    checkpoint says they are.

    Lightning restores the selection state (best score and path) only when the stored
    ``dirpath`` equals the callback's, so a moved or copied run forgets its best score and
    selects another epoch; and it takes the stored paths as they are, so a checkpoint can point
    the run at any file or URL. Here the state is restored wherever the run now lives, and each
    stored path is replaced by the file of the same name in this callback's ``dirpath`` (with a
    fixed ``filename``, by that file): a path inside a checkpoint is never used. With
    ``resuming`` set (run.py sets it before a resume), Lightning's "Checkpoint directory ...
    exists and is not empty" warning, which a resume always meets, is not shown.
    """

    resuming = False

    def own_file(self, stored: str, filename: str | None = None) -> str:
        """The file in this callback's ``dirpath`` that stands for the stored path ``stored``
        (a file named ``filename``, the callback's own by default)."""
        if not stored:
            return ""
        filename = self.filename if filename is None else filename
        name = f"{filename}{self.FILE_EXTENSION}"
        if filename is None or "{" in filename:  # a templated name: the stored one's
            name = Path(stored.replace("\\", "/")).name
        return str(Path(self.dirpath) / name)

    @property
    def state_key(self) -> str:
        # the key Lightning's ModelCheckpoint has: checkpoints of either class load into both
        name = "ModelCheckpoint" if type(self) is RunCheckpoint else type(self).__qualname__
        return name + repr(
            {
                "monitor": self.monitor,
                "mode": self.mode,
                "every_n_train_steps": self._every_n_train_steps,
                "every_n_epochs": self._every_n_epochs,
                "train_time_interval": self._train_time_interval,
            }
        )

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:  # Lightning's private
        if not self.resuming:
            super()._ModelCheckpoint__warn_if_dir_not_empty(dirpath)

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_model_score = state_dict.get("best_model_score")
        self.best_model_path = self.own_file(state_dict.get("best_model_path", ""))
        self.kth_best_model_path = self.own_file(state_dict.get("kth_best_model_path", ""))
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.best_k_models = {
            self.own_file(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
        }
        last = state_dict.get("last_model_path", "")
        self.last_model_path = self.own_file(last, self.CHECKPOINT_NAME_LAST)


class PaperRecipe(RunCheckpoint):
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
        # one file, rewritten: a restart after a kill must not write best-train-loss-v1.ckpt
        kwargs.setdefault("enable_version_counter", False)
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
        # a weights-only load of this run's own file (best_model_path is never a stored path)
        checkpoint = runner.load_checkpoint(self.best_model_path)
        trainer.strategy.load_model_state_dict(checkpoint)
        return True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.milestones or epoch in self.applied:
            return
        if self._reload_best(trainer):
            log.info(
                "recipe: epoch %d, reloaded %s (%s=%.4g), Adam restarted",
                epoch,
                self.best_model_path,
                self.monitor,
                float(self.best_model_score),
            )
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # a fresh Adam: no moments, step counts from zero
        self.applied.append(epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._reload_best(trainer):
            log.info(
                "recipe: reporting %s (%s=%.4g)",
                self.best_model_path,
                self.monitor,
                float(self.best_model_score),
            )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "milestones_applied": list(self.applied)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.applied = list(state_dict.get("milestones_applied", []))


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain types.

    Plain types only, so checkpoints load with ``torch.load(weights_only=True)``.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [
            kind,
            torch.from_numpy(key.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
