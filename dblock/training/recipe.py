"""The paper's training recipe (docs/model.md §5): at each lr milestone the model is reloaded
from the checkpoint with the lowest training loss so far and Adam restarts; plus the RNG state
that makes a resumed run exact.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from dblock.training.checkpoint_io import RunCheckpoint
from dblock.training.checkpoints import load_checkpoint

log = logging.getLogger(__name__)



class PaperRecipe(RunCheckpoint):
    """The paper's training recipe (docs/model.md §5) on top of Lightning's checkpointing.

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
        checkpoint = load_checkpoint(self.best_model_path)
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
