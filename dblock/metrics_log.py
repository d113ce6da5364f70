"""The csv logger of a run that keeps its history: ``<run dir>/csv/metrics.csv``.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds one ("Previous log files in this
directory will be deleted"), so a resumed run, an evaluation (``train=false``) or a rerun of a
finished run lost the training history. This one reads the file it finds and keeps it:

- ``resume_at(epoch)``: training starts at ``epoch`` (0-based; 0 from scratch, k + 1 when
  resumed from a checkpoint of epoch k). The rows of that epoch and later ones (an epoch cut
  short, or a previous run's test) are dropped, so every epoch appears once, also after a
  resume from an earlier epoch's checkpoint. Nothing calls it for an evaluation: its test row
  is added to the history.
- every call to ``log_metrics`` rewrites the file atomically (rows of whole epochs only ever
  reach it: the task logs per epoch), so a kill loses no epoch that its checkpoint kept.
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

    def keep_before(self, epoch: int) -> None:
        """Drop the rows of ``epoch`` and later (training restarts at ``epoch``)."""

        def before(row: dict) -> bool:
            try:
                return float(row.get("epoch") or 0) < epoch
            except ValueError:
                return False

        dropped = len(self.kept) - len(kept := [r for r in self.kept if before(r)])
        self.kept = kept
        if dropped:
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
    def resume_at(self, epoch: int) -> None:
        """Training (re)starts at ``epoch`` (0-based): rows of that epoch and later go."""
        self.experiment.keep_before(epoch)
