"""The run: compose -> guard -> build -> fit -> test -> results.json.

python run.py                                  # d-block SNN on the embedded dataset
python run.py model=standard                   # the standard recurrent SNN
python run.py model=dblock d=5 layers=2 dataset=shd
python run.py -m d=1,5 layers=1,2              # a sweep: one results.json per job

Everything that knows Hydra lives in ``dblock/launch``, everything that knows Lightning in
``dblock/training``; this file strings the steps together.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext

import hydra
from omegaconf import DictConfig

from dblock import files
from dblock.errors import CheckpointWriteError, ConfigError, NonFiniteError
from dblock.launch import exits
from dblock.launch import job as jobs
from dblock.launch.config import validate
from dblock.launch.console import set_job_label, silence_library_noise
from dblock.launch.lock import RunLock
from dblock.launch.multirun import parallel_job_label
from dblock.launch.wandb_setup import finish_wandb
from dblock.runtime import prepare_process
from dblock.training import results
from dblock.training.cluster import is_rank_zero, watch_requeue
from dblock.training.signals import SignalStop, StopTogether


def train_and_test(cfg: DictConfig, job: jobs.Job, stop: SignalStop, ckpt_path, checked) -> dict:
    """Build, check the checkpoint it starts from (``ckpt_path``; then ``checked()``), fit (or,
    with train=false, only evaluate) and test; the run's summary for results.json."""
    start = time.perf_counter()
    datamodule, task, trainer = jobs.build(cfg, job, ckpt_path)
    files.remove_orphans(jobs.orphan_dirs(datamodule, job))
    watch_requeue(trainer, stop)
    trainer.callbacks.append(StopTogether(stop))  # DDP: a signal to one process stops all
    ckpt = jobs.start_from(cfg, job, task, trainer, ckpt_path)
    checked()
    info = jobs.run_info(cfg, job)

    def summary(status="ok", test=None, **extra) -> dict:
        timing = {"train/epoch_time_s": task.mean_epoch_time()}
        return results.summary(
            info, test, status, **extra, **timing, wall_time_s=time.perf_counter() - start
        )

    def test(path: str | None) -> dict:
        metrics = trainer.test(
            task, datamodule=datamodule, ckpt_path=path, verbose=False, weights_only=True
        )
        return metrics[0] if metrics else {}

    if not cfg.train:
        tested = jobs.tested(ckpt_path, ckpt)
        return summary(test=test(ckpt_path), **tested, epoch=int(ckpt["epoch"]) + 1)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (NonFiniteError, files.DiskFullError, CheckpointWriteError) as err:
        last_good = jobs.checkpoint_paths(trainer)[0]
        return summary("failed", error=str(err), epoch=trainer.current_epoch,
                       last_good_ckpt=last_good)  # fmt: skip
    epochs = trainer.current_epoch
    last, best = jobs.checkpoint_paths(trainer)
    path = (best if cfg.test_ckpt == "best" else last) or last  # None: no checkpoint callback
    ckpt = jobs.load_checkpoint(path, task, train=True) if path else None
    score = jobs.selection_score(trainer, cfg.selection.monitor)
    return summary(test=test(path), **jobs.tested(path, ckpt), selection_score=score, epoch=epochs)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    silence_library_noise()
    job = jobs.Job.current()  # Hydra's runtime config, read once
    set_job_label(parallel_job_label(job))
    was_fresh = exits.fresh(job.out_dir)
    try:
        resolved = validate(cfg)
    except ConfigError as err:
        exits.refuse(str(err), job, was_fresh)
    verbose = bool(cfg.get("verbose", False))
    if verbose:
        logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.INFO)
    done = jobs.finished(cfg, job.out_dir, resolved) if job.multirun and not cfg.rerun else None
    if done is not None:  # a rerun sweep: this job is done (rerun=true runs it again)
        exits.skipped(job)
        return done.get(cfg.objective)
    prepare_process()  # allocator tuned for large CPU tensors; a hint when the CPU is busy
    rank0 = is_rank_zero()
    start = time.perf_counter()
    with exits.reported(job, was_fresh):
        # one run per run dir (rank 0 holds the lock; the other DDP processes share the dir)
        lock = RunLock(job.out_dir) if rank0 else None
        with lock or nullcontext(), SignalStop() as stop:

            def checked() -> None:  # the run's config.yaml, once its checkpoint fits
                if rank0:
                    jobs.write_config(job.out_dir, resolved, verbose)

            ckpt_path = jobs.resume_path(cfg)
            try:
                summary = train_and_test(cfg, job, stop, ckpt_path, checked)
            except BaseException:
                if stop.signum is None:
                    raise
                summary = jobs.interrupted(cfg, job, stop, start, lock, ckpt_path)
            stop.quiet = True  # the work is done: a signal now waits until results.json is written
            if rank0:  # one results.json per run, also under DDP
                jobs.write_results(job.out_dir, summary)
    finish_wandb()
    ok = summary["status"] == "ok" and stop.signum is None
    line = results.one_line(summary, str(job.out_dir), trained=cfg.train) if ok else None
    exits.finish(summary, stop, job, line)
    return summary.get(cfg.objective) if ok else None  # what a sweeper such as Optuna optimises


if __name__ == "__main__":
    from dblock.launch.preflight import check_choices, preflight

    try:  # every error in the settings before Hydra creates a folder or prints a line
        check_choices(sys.argv[1:])
        sys.argv += preflight(sys.argv[1:])
    except ConfigError as err:
        exits.fail(str(err))
    except Exception:  # a case the early check does not know: Hydra and main() still check
        pass
    main()
