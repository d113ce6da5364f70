"""The one entry point: compose -> instantiate -> fit -> test -> results.json.

python run.py                                  # d-block SNN on the embedded dataset
python run.py model=standard                   # the standard recurrent SNN
python run.py model=dblock d=5 layers=2 dataset=shd
python run.py -m d=1,5 layers=1,2              # a sweep: one results.json per job
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from dblock.errors import CheckpointWriteError, ConfigError, NonFiniteError, first_line
from dblock.files import DiskFullError, remove_orphans
from dblock.launch.config import (
    known_keys,
    validate,
)
from dblock.launch.console import file_log, job_prefix, set_job_label, silence_library_noise
from dblock.launch.exits import fail, fresh, refuse, sweep_stops
from dblock.launch.job import (
    build,
    check_resume,
    checkpoint_paths,
    finished,
    interrupted,
    load_checkpoint,
    orphan_dirs,
    resume_path,
    run_info,
    tested,
    write_config,
    write_results,
)
from dblock.launch.lock import RunLock
from dblock.launch.multirun import parallel_job_label, skipped_jobs
from dblock.launch.wandb_setup import finish_wandb
from dblock.runtime import prepare_process
from dblock.training import results
from dblock.training.cluster import requeue_slurm_job, watch_requeue
from dblock.training.results import one_line
from dblock.training.signals import SignalStop, StopTogether


def train_and_test(
    cfg: DictConfig, stop: SignalStop, ckpt_path: str | None, checked
) -> dict:
    """Build, check the checkpoint (``checked()`` once it fits: config.yaml is written then),
    fit, test; the run's summary. ``ckpt_path``: the checkpoint the run starts from."""
    start = time.perf_counter()
    datamodule, task, trainer = build(cfg, ckpt_path)
    remove_orphans(orphan_dirs(datamodule))
    watch_requeue(trainer, stop)
    trainer.callbacks.append(StopTogether(stop))  # DDP: a signal to one process stops all
    try:
        ckpt = load_checkpoint(ckpt_path, task, cfg.train) if ckpt_path is not None else None
        if ckpt is not None and cfg.train:
            check_resume(cfg, ckpt_path, ckpt)
    except ConfigError as err:
        if cfg.ckpt_path is None:  # the run dir's own last.ckpt (resume_path)
            raise ConfigError(
                f"{err}; this run dir holds another run: choose another hydra.run.dir, or "
                "train from scratch there with rerun=true (its checkpoints are overwritten)"
            ) from None
        raise
    if ckpt is not None and cfg.train:
        for callback in trainer.checkpoint_callbacks:  # its folder holds the run's checkpoints
            callback.resuming = True
    checked()
    info = run_info(cfg)
    if cfg.train:  # the metric history continues at the first epoch trained now
        for logger in trainer.loggers:
            if hasattr(logger, "resume_at") and ckpt is not None:
                logger.resume_at(int(ckpt["epoch"]) + 1, ckpt.get("epoch_log"))
            elif hasattr(logger, "resume_at"):
                logger.resume_at(0)
    if not cfg.train:
        metrics = trainer.test(
            task, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True
        )
        return results.summary(
            info,
            metrics[0] if metrics else {},
            **tested(ckpt_path, ckpt),
            epoch=int(ckpt["epoch"]) + 1,
            **{"train/epoch_time_s": task.mean_epoch_time()},
            wall_time_s=time.perf_counter() - start,
        )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (NonFiniteError, DiskFullError, CheckpointWriteError) as err:
        return results.summary(
            info,
            status="failed",
            error=str(err),
            epoch=trainer.current_epoch,
            last_good_ckpt=checkpoint_paths(trainer)[0],
            **{"train/epoch_time_s": task.mean_epoch_time()},
            wall_time_s=time.perf_counter() - start,
        )
    epochs, epoch_time = trainer.current_epoch, task.mean_epoch_time()
    last, best = checkpoint_paths(trainer)
    score = next(
        (
            float(c.best_model_score)
            for c in trainer.checkpoint_callbacks
            if c.monitor == cfg.selection.monitor and c.best_model_score is not None
        ),
        None,
    )
    path = (best if cfg.test_ckpt == "best" else last) or last  # None: no checkpoint callback
    ckpt = load_checkpoint(path, task, train=True) if path else None
    metrics = trainer.test(
        task, datamodule=datamodule, ckpt_path=path, verbose=False, weights_only=True
    )
    return results.summary(
        info,
        metrics[0] if metrics else {},
        **tested(path, ckpt),
        selection_score=score,
        epoch=epochs,
        **{"train/epoch_time_s": epoch_time},
        wall_time_s=time.perf_counter() - start,
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    silence_library_noise()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    set_job_label(parallel_job_label())
    was_fresh = fresh(out_dir)
    try:
        resolved = validate(cfg)
    except ConfigError as err:
        refuse(str(err), out_dir, was_fresh)
    verbose = bool(cfg.get("verbose", False))
    if verbose:
        logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.INFO)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    done = finished(cfg, out_dir, resolved) if multirun and not cfg.get("rerun") else None
    if done is not None:  # a rerun sweep: this job is done (rerun=true runs it again)
        line = f"skipped {out_dir}: done (results.json: ok; rerun=true runs it again)"
        print(line)
        file_log.info(line)
        return done.get(cfg.objective)
    prepare_process()  # allocator tuned for large CPU tensors; a hint when the CPU is busy
    rank0 = rank_zero_only.rank == 0
    start = time.perf_counter()
    try:
        # one run per run dir (rank 0 holds the lock; the other DDP processes share the dir)
        lock = RunLock(out_dir) if rank0 else None
        with lock or nullcontext(), SignalStop() as stop:

            def checked() -> None:  # the config.yaml of the run, once its checkpoint fits
                if rank0:
                    write_config(out_dir, resolved, verbose)

            ckpt_path = resume_path(cfg)
            try:
                summary = train_and_test(cfg, stop, ckpt_path, checked)
            except BaseException:
                if stop.signum is None:
                    raise
                summary = interrupted(cfg, stop, start, lock, ckpt_path)
            stop.quiet = True  # the work is done: a signal now waits until results.json is written
            if rank0:  # one results.json per run, also under DDP
                write_results(out_dir, summary)
    except (ValueError, InstantiationException, FileNotFoundError) as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        refuse(str(cause), out_dir, was_fresh)
    except (DiskFullError, CheckpointWriteError) as err:
        fail(str(err), code=3, out_dir=out_dir)
    except Exception as err:  # a crash: Hydra prints the traceback, the run's log keeps a line
        file_log.error("%s: %s", type(err).__name__, first_line(err))
        raise
    finish_wandb()
    if summary["status"] == "interrupted":  # also stops a -m sweep: say which jobs did not run
        message = f"{summary['error']} after {summary['epoch']} saved epoch(s)"
        if stop.requeue and rank0 and requeue_slurm_job():
            message += "; the SLURM job is requeued and resumes from last.ckpt"
        elif summary["resume"]:
            message += f"; resume with: {summary['resume']}"
        fail(message + skipped_jobs(), code=stop.exit_code, out_dir=out_dir)
    if stop.signum is not None:  # arrived as this job ended: its results stand, a sweep stops
        print(
            f"{job_prefix()}error: {stop.name} received as the run ended{skipped_jobs()}",
            file=sys.stderr,
        )
        sweep_stops()
        sys.exit(stop.exit_code)
    if summary["status"] != "ok":
        message = f"{summary['error']} (results.json: {out_dir}/results.json)"
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep's other jobs still run
            print(f"{job_prefix()}error: {message}", file=sys.stderr)
            file_log.error(message)
            return None
        fail(message, code=3, out_dir=out_dir)
    if rank0:
        line = one_line(summary, str(out_dir), trained=cfg.train)
        print(job_prefix() + line)
        file_log.info(line)
    return summary.get(cfg.objective)  # what a sweeper such as Optuna optimises


if __name__ == "__main__":
    from dblock.launch.preflight import check_choices, preflight

    try:  # every error in the settings before Hydra creates a folder or prints a line
        check_choices(sys.argv[1:])
        sys.argv += preflight(sys.argv[1:], validate, known_keys)
    except ConfigError as err:
        fail(str(err))
    except Exception:  # a case the early check does not know: Hydra and main() still check
        pass
    main()
