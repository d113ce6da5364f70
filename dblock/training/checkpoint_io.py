"""Lightning's side of checkpoints: atomic writes through the trainer's checkpoint plugin,
every load routed to the weights-only loader, the checkpoint callback that finds its files in its
own folder (never at a path stored inside a checkpoint), and the order the callbacks save in.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from dblock.errors import CheckpointWriteError
from dblock.files import DiskFullError, atomic_write
from dblock.training import checkpoints


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
        loaded weights-only (``checkpoints.load_checkpoint``), whatever the caller asked for. A URL
        is refused, never downloaded."""
        return checkpoints.load_checkpoint(path)


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
