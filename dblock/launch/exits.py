"""How a run ends: one ``error:`` line on stderr (and in the run's log), an exit code (2: a
setting or input is refused; 3: the run failed, e.g. a full disk; 128 + N: stopped by signal N),
a run folder made only for a refused job removed again, and a sweep that stops at this job still
summarised.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import InstantiationException

from dblock import sweeps
from dblock.errors import CheckpointWriteError, first_line
from dblock.files import DiskFullError
from dblock.launch.console import file_log, job_prefix
from dblock.launch.job import Job
from dblock.launch.lock import RunLock
from dblock.launch.multirun import skipped_jobs
from dblock.training.cluster import is_rank_zero, requeue_slurm_job


def fail(message: str, code: int = 2, out_dir: Path | None = None, job: Job | None = None) -> None:
    """``error: message`` on stderr (and in the run's log file when the run keeps its folder),
    then exit with ``code``; a sweep that stops here writes its summary so far."""
    print(f"{job_prefix()}error: {message}", file=sys.stderr)
    if out_dir is not None and out_dir.is_dir():
        file_log.error(message)
    sweep_stops(job)
    sys.exit(code)


def sweep_stops(job: Job | None) -> None:
    """A -m sweep that ends at this job (a signal, a refusal) still writes and prints its
    summary so far (rank 0 only)."""
    if job is not None and job.multirun and is_rank_zero():
        sweeps.report(job.sweep_dir)


def fresh(out_dir: Path) -> bool:
    """Does ``out_dir`` hold only what Hydra made for this job: ``.hydra/`` and an empty log?"""
    return all(
        (p.name == ".hydra" and p.is_dir()) or (p.suffix == ".log" and p.stat().st_size == 0)
        for p in out_dir.iterdir()
    )


def refuse(message: str, job: Job, was_fresh: bool) -> None:
    """Stop with exit code 2; a run folder made for this job that holds no checkpoint goes."""
    out_dir = job.out_dir
    checkpoints = out_dir / "checkpoints"
    if (  # inside a -m sweep the folder stays: the sweep summary lists the job as refused
        was_fresh
        and not job.multirun
        and not (checkpoints.is_dir() and any(checkpoints.iterdir()))
        and not (out_dir / RunLock.NAME).exists()  # another run's (ours is released)
        and out_dir not in (Path.cwd(), *Path.cwd().parents)
    ):
        shutil.rmtree(out_dir, ignore_errors=True)
    fail(message, out_dir=out_dir, job=job)


@contextmanager
def reported(job: Job, was_fresh: bool) -> Iterator[None]:
    """Turn what stops a run into its exit: a refused setting or input (exit 2, a fresh run
    folder removed), a full disk or a failed checkpoint write (exit 3); any other crash keeps
    Hydra's traceback and leaves one line in the run's log."""
    try:
        yield
    except (ValueError, InstantiationException, FileNotFoundError) as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        refuse(str(cause), job, was_fresh)
    except (DiskFullError, CheckpointWriteError) as err:
        fail(str(err), code=3, out_dir=job.out_dir, job=job)
    except Exception as err:
        file_log.error("%s: %s", type(err).__name__, first_line(err))
        raise


def skipped(job: Job) -> None:
    """Say that this job of a rerun sweep is done already."""
    line = f"skipped {job.out_dir}: done (results.json: ok; rerun=true runs it again)"
    print(line)
    file_log.info(line)


def finish(summary: dict, stop, job: Job, line: str | None) -> None:
    """Say how the run ended and exit with its code: interrupted (128 + N; a -m sweep stops and
    names the jobs that did not run), failed (3; in a sweep the other jobs still run), or ok
    (its one-line result, ``line``, from rank 0)."""
    out_dir = job.out_dir
    if summary["status"] == "interrupted":
        message = f"{summary['error']} after {summary['epoch']} saved epoch(s)"
        if stop.requeue and is_rank_zero() and requeue_slurm_job():
            message += "; the SLURM job is requeued and resumes from last.ckpt"
        elif summary["resume"]:
            message += f"; resume with: {summary['resume']}"
        fail(message + skipped_jobs(job), code=stop.exit_code, out_dir=out_dir, job=job)
    if stop.signum is not None:  # arrived as this job ended: its results stand, a sweep stops
        ended = f"{stop.name} received as the run ended{skipped_jobs(job)}"
        print(f"{job_prefix()}error: {ended}", file=sys.stderr)
        sweep_stops(job)
        sys.exit(stop.exit_code)
    if summary["status"] != "ok":
        message = f"{summary['error']} (results.json: {out_dir}/results.json)"
        if job.multirun:  # the sweep's other jobs still run
            print(f"{job_prefix()}error: {message}", file=sys.stderr)
            file_log.error(message)
            return
        fail(message, code=3, out_dir=out_dir, job=job)
    if line is not None and is_rank_zero():
        print(job_prefix() + line)
        file_log.info(line)
