"""The process and cluster as Lightning sees them: the global seed, the rank, and SLURM (a
requeued job resumes from its last.ckpt by itself; the requeue signal stops the run cleanly
before ``scontrol requeue``).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess

from dblock.training.signals import SignalStop

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and the dataloader workers (Lightning's ``seed_everything``)."""
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)


def is_rank_zero() -> bool:
    """Is this the process that writes the run's files (rank 0, or the only one)?"""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def _environment(trainer):
    """The trainer's cluster environment (Lightning keeps it on a private connector: a single
    device strategy has none of its own)."""
    return trainer._accelerator_connector.cluster_environment


def watch_requeue(trainer, stop: SignalStop) -> None:
    """Under SLURM with auto-requeue (Lightning's ``SLURMEnvironment``, on by default), its
    requeue signal (SIGUSR1) stops the run cleanly and requeues the job. Installing the handler
    first keeps Lightning's own one out: that one saves a mid-batch checkpoint (hpc_ckpt_N.ckpt)
    from inside the signal handler, which cannot be resumed exactly."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = _environment(trainer)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
        stop.watch_requeue(env.requeue_signal)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array jobs included); False where that fails."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    )
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.warning("cannot requeue: no SLURM job id in the environment")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
    except OSError as err:
        log.warning("cannot requeue SLURM job %s: %s", job, err)
        return False
    if not done:
        log.warning("scontrol requeue %s failed", job)
    return done
