"""What a run prints besides progress: the console log format (``warning: ...``,
``error: ...``), the run's log file, and the library warnings no setting can fix turned off.
"""

from __future__ import annotations

import logging
import warnings

from dblock.training.progress import _job_label

# records for the run's log file only (the console shows a bar instead); set up in
# conf/hydra/default.yaml as a logger with only the file handler
file_log = logging.getLogger("dblock.logfile")



def set_job_label(label: str) -> None:
    """Prefix every console line of this job with ``[label]`` (empty: no prefix): parallel jobs
    of a sweep (joblib, ...) share one terminal, and their lines interleave."""
    _job_label[0] = label


def job_prefix() -> str:
    """``[label] `` of this job, or empty when it runs alone."""
    return f"[{_job_label[0]}] " if _job_label[0] else ""


class ConsoleFormatter(logging.Formatter):
    """INFO and below as the bare message; warnings and errors as ``<level>: message``; lines
    of parallel jobs prefixed with their job's label (``set_job_label``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return job_prefix() + text


def silence_library_noise() -> None:
    """Turn off warnings that come from inside the libraries and that no setting can fix.

    torch 2.13 deprecates ``LeafSpec``, which Lightning 2.6's ``_pytree`` helper still builds.
    Lightning warns when an epoch has fewer batches than ``log_every_n_steps``; dblock's task
    logs once per epoch, never per step, so that interval changes nothing.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        module=r"pytorch_lightning\.loops\.fit_loop",
    )
    # a run dir with checkpoints is resumed (saying so) or, with rerun=true, started over on
    # purpose (run.py's resume_path): Lightning's warning adds nothing
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
