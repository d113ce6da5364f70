"""The csv logger of a run that keeps its history: ``<run dir>/csv/metrics.csv``.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds one ("Previous log files in this
directory will be deleted"), so a resumed run, an evaluation (``train=false``) or a rerun of a
finished run lost the training history. This one reads the file it finds and keeps it:

- ``resume_at(epoch)``: training starts at ``epoch`` (0-based; 0 from scratch, k + 1 when
  resumed from a checkpoint of epoch k). The rows of that epoch and later ones (an epoch cut
  short, or a previous run's test) are dropped, so every epoch appears once, also after a
  resume from an earlier epoch's checkpoint. Nothing calls it for an evaluation: its test row
  is added to the history.
- every call to ``log_metrics`` rewrites the file atomically (the task logs per epoch, so
  that is a few rows per epoch). Lightning logs an epoch's training row after its checkpoints
  are written; the checkpoint stores that row (``SNNTask.on_save_checkpoint``), and a resume
  adds it back when a kill came in between, so no epoch its checkpoint kept is missing.
"""

from __future__ import annotations

import csv
import io
import logging
import os

from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dblock.files import atomic_write

log = logging.getLogger(__name__)


def before_epoch(row: dict, epoch: int) -> bool:
    """Whether a csv row belongs to an epoch before ``epoch`` (rows without one: no)."""
    try:
        return float(row.get("epoch") or 0) < epoch
    except ValueError:
        return False


class KeepingWriter(ExperimentWriter):
    """Lightning's csv writer, less the deletion: the rows already in ``metrics.csv`` stay."""

    def __init__(self, log_dir: str) -> None:
        self.metrics: list[dict] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict = {}
        self._fs = get_filesystem(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        self.kept: list[dict] = []
        try:
            with open(self.metrics_file_path, newline="") as f:
                self.kept = list(csv.DictReader(f))
        except FileNotFoundError:
            pass
        except (OSError, csv.Error, UnicodeDecodeError) as err:  # unreadable: keep it aside
            aside = self.metrics_file_path + ".unreadable"
            os.replace(self.metrics_file_path, aside)
            log.warning("%s could not be read (%s); kept as %s", self.metrics_file_path, err, aside)

    def keep_before(self, epoch: int, last_row: dict | None = None) -> None:
        """Drop the rows of ``epoch`` and later (training restarts at ``epoch``); ``last_row``:
        the training row of epoch ``epoch - 1`` as its checkpoint stored it, added when the
        file lacks it (the run was killed after the checkpoint, before the row was logged)."""
        kept = [r for r in self.kept if before_epoch(r, epoch)]
        changed, self.kept = len(kept) != len(self.kept), kept
        lost = last_row is not None and last_row.get("epoch") == epoch - 1
        if lost and not any(
            r.get("train/loss") not in (None, "") and not before_epoch(r, epoch - 1) for r in kept
        ):
            self.kept.append(dict(last_row))
            changed = True
        if changed:
            self.save(force=True)

    def save(self, force: bool = False) -> None:
        if not self.metrics and not force:
            return
        self.kept += self.metrics
        self.metrics = []
        keys = sorted(set().union(*self.kept)) if self.kept else []
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.kept)
        data = text.getvalue().encode()
        atomic_write(self.metrics_file_path, lambda f: f.write(data))


class CSVLogger(LightningCSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` that keeps the history (see the module doc)."""

    def __init__(self, save_dir, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(save_dir, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingWriter:
        if self._experiment is None:
            self._experiment = KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, epoch: int, last_row: dict | None = None) -> None:
        """Training (re)starts at ``epoch`` (0-based): rows of that epoch and later go;
        ``last_row``: the checkpoint's training row of the epoch before (``KeepingWriter``)."""
        self.experiment.keep_before(epoch, last_row)
