"""A job inside a Hydra multirun: which jobs a stopped sweep did not run, and the label
that prefixes a parallel job's console lines.
"""

from __future__ import annotations

import sys

from dblock.launch.job import Job


def skipped_jobs(job: Job) -> str:
    """Which jobs of a -m sweep did not run because this one was interrupted."""
    if not job.multirun:
        return ""
    jobs = sweep_jobs(job)
    num = job.num
    if jobs is None:
        return f"; the sweep stops: the jobs after job {num} did not run"
    rest = jobs[num + 1 :]
    if not rest:
        return "; it was the sweep's last job"
    listed = ", ".join(f"#{num + 1 + i} ({' '.join(o)})" for i, o in enumerate(rest))
    return f"; the sweep stops: {len(rest)} job(s) did not run: {listed}"


def sweep_jobs(job: Job) -> list[list[str]] | None:
    """The overrides of every job of this sweep, as Hydra's basic sweeper splits them (None
    with another sweeper)."""
    basic = str(job.sweeper.get("_target_", "")).endswith("BasicSweeper")
    if not basic or not str(job.launcher.get("_target_", "")).endswith("BasicLauncher"):
        return None  # another sweeper, or jobs run in parallel
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        params = [f"{k}={v}" for k, v in (job.sweeper.get("params") or {}).items()]
        argv = [a for a in sys.argv[1:] if not a.startswith(("-", "hydra.", "hydra/"))]
        overrides = parser.parse_overrides(params) + parser.parse_overrides(argv)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # a sweep Hydra ran but we cannot re-split: say less
        return None
    return [list(overrides) for batch in batches for overrides in batch]


def parallel_job_label(job: Job) -> str:
    """The label of this job when a sweep's jobs run side by side (any launcher but Hydra's
    basic one, which runs them one after another): its folder's name, which names it by the
    values it sweeps (``dataset.n_train=256``) or its number. Empty otherwise."""
    return job.out_dir.name if job.parallel else ""
