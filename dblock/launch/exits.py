"""How a run ends when it cannot go on: one ``error:`` line on stderr (and in the run's log),
an exit code (2: a setting is refused; 3: the run failed, e.g. a full disk; 128 + N: stopped by
signal N), and a run folder made only for a refused job removed again.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from dblock import sweeps
from dblock.launch.console import file_log, job_prefix
from dblock.launch.lock import RunLock


def fail(message: str, code: int = 2, out_dir: Path | None = None) -> None:
    """``error: message`` on stderr (and in the run's log file when the run keeps its folder),
    then exit with ``code``."""
    print(f"{job_prefix()}error: {message}", file=sys.stderr)
    if out_dir is not None and out_dir.is_dir():
        file_log.error(message)
    sweep_stops()
    sys.exit(code)


def sweep_stops() -> None:
    """A -m sweep that ends at this job (a signal, a refusal) still writes and prints its
    summary so far (rank 0 only)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        if rank_zero_only.rank == 0:
            sweeps.report(HydraConfig.get().sweep.dir)


def fresh(out_dir: Path) -> bool:
    """Does ``out_dir`` hold only what Hydra made for this job: ``.hydra/`` and an empty log?"""
    return all(
        (p.name == ".hydra" and p.is_dir()) or (p.suffix == ".log" and p.stat().st_size == 0)
        for p in out_dir.iterdir()
    )


def refuse(message: str, out_dir: Path, was_fresh: bool) -> None:
    """Stop with exit code 2; a run folder made for this job that holds no checkpoint goes."""
    checkpoints = out_dir / "checkpoints"
    if (  # inside a -m sweep the folder stays: the sweep summary lists the job as refused
        was_fresh
        and HydraConfig.get().mode != RunMode.MULTIRUN
        and not (checkpoints.is_dir() and any(checkpoints.iterdir()))
        and not (out_dir / RunLock.NAME).exists()  # another run's (ours is released)
        and out_dir not in (Path.cwd(), *Path.cwd().parents)
    ):
        shutil.rmtree(out_dir, ignore_errors=True)
    fail(message, out_dir=out_dir)
