"""The pieces of one Hydra job that ``run.py`` strings together: build the objects, load and
check a checkpoint against the run, describe the run for results.json, write its config and
results, and report a run stopped by a signal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dblock import sweeps
from dblock.errors import CheckpointWriteError, ConfigError
from dblock.files import DiskFullError, atomic_write, write_json
from dblock.launch.config import check_data_dir, check_selection
from dblock.launch.wandb_setup import wandb_run_id
from dblock.training import checkpoints, results
from dblock.training.checkpoint_io import order_checkpoints
from dblock.training.checkpoints import check_checkpoint, checkpoint_epoch
from dblock.training.cluster import seed_everything
from dblock.training.results import existing, resume_command
from dblock.training.signals import SignalStop

log = logging.getLogger("dblock")


@dataclass(frozen=True)
class Job:
    """What Hydra says of this job, read once from its runtime config (``HydraConfig``)."""

    out_dir: Path  # the run folder
    cwd: str  # where the command was typed
    multirun: bool
    num: int  # the job's number in its sweep (0 outside one)
    sweep_dir: str | None  # the sweep's folder, in a multirun
    choices: dict  # the config groups' choices (``dataset=shd``, ``recipe=paper``)
    overrides: tuple[str, ...]  # the job's overrides as typed
    config_name: str | None
    sweeper: dict = field(default_factory=dict)  # plain copies, for re-splitting a sweep
    launcher: dict = field(default_factory=dict)

    @classmethod
    def current(cls) -> Job:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            out_dir=Path(hc.runtime.output_dir),
            cwd=hc.runtime.cwd,
            multirun=multirun,
            num=hc.job.num if multirun else 0,
            sweep_dir=str(hc.sweep.dir) if multirun else None,
            choices=dict(hc.runtime.choices),
            overrides=tuple(hc.overrides.task),
            config_name=hc.job.config_name,
            sweeper=OmegaConf.to_container(hc.sweeper),
            launcher=OmegaConf.to_container(hc.launcher),
        )

    @property
    def parallel(self) -> bool:
        """A sweep whose jobs run side by side (any launcher but Hydra's basic one)."""
        return self.multirun and not str(self.launcher.get("_target_", "")).endswith(
            "BasicLauncher"
        )



def build(cfg: DictConfig, job: Job, ckpt_path: str | None = None):
    """Instantiate the datamodule, network, task, loggers, callbacks and trainer from ``cfg``
    (``ckpt_path``: the checkpoint the run starts from, which a wandb run continues)."""
    seed_everything(cfg.seed)
    datamodule = instantiate(cfg.dataset, _convert_="all")
    # generated data, or files that will be downloaded, need only a writable data_dir
    check_data_dir(datamodule.data_dir, datamodule.writes_data_dir())
    check_selection(cfg.selection.monitor, datamodule.has_val)
    task = instantiate(cfg.task, model=instantiate(cfg.model), _convert_="all")
    task.run_config = run_config(cfg, job)  # stored in every checkpoint, checked on resume / eval
    # an entry set to null (e.g. callbacks.best=null) is switched off
    loggers = [
        instantiate(c, **logger_args(c, cfg, job, ckpt_path))
        for c in (cfg.get("logger") or {}).values()
        if c is not None
    ]
    for logger in loggers:  # the resolved config, e.g. as the wandb run's config
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=order_checkpoints(callbacks)
    )
    spawns = (
        trainer.world_size > 1
        and not trainer.strategy.cluster_environment.creates_processes_externally
    )
    if spawns and job.multirun:
        # Lightning would start each extra process with this command line: the whole sweep again
        raise ConfigError(
            "trainer=ddp inside a -m sweep needs its processes started by SLURM: use "
            "hydra/launcher=submitit_slurm (README, Long runs and clusters), or run the jobs one "
            "at a time without -m"
        )
    return datamodule, task, trainer


def logger_args(entry: DictConfig, cfg: DictConfig, job: Job, ckpt_path: str | None) -> dict:
    """What run.py adds to a wandb logger: the run dir's run id (a resumed run continues its
    wandb run) and, inside a sweep without an experiment, the sweep's group."""
    if not str(entry.get("_target_", "")).endswith("WandbLogger"):
        return {}
    out = {}
    if entry.get("id") is None:
        fresh_start = cfg.train and ckpt_path is None
        out = {"id": wandb_run_id(job.out_dir, fresh_start), "resume": "allow"}
    if entry.get("group") is None and job.multirun:
        out["group"] = sweeps.wandb_group(None, job.sweep_dir)
    return out


def run_config(cfg: DictConfig, job: Job) -> dict:
    """The model and dataset settings a checkpoint must match (plain types, see runner)."""
    return {
        "dataset": {
            "name": job.choices.get("dataset"),
            **OmegaConf.to_container(cfg.dataset, resolve=True),
        },
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "training": {  # what a resume must not change (TRAINING_KEYS)
            "recipe": job.choices.get("recipe"),
            "selection.monitor": cfg.selection.monitor,
            "selection.mode": cfg.selection.mode,
            "task.lr": cfg.task.lr,
            "task.milestones": list(cfg.task.milestones),
            "task.gamma": cfg.task.gamma,
        },
    }


def load_checkpoint(path: str, task, train: bool) -> dict:
    """Load ``path`` safely (tensors and plain types only) and check it fits this run."""
    ckpt = checkpoints.load_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    check_checkpoint(ckpt, path, shapes, task.run_config, evaluate=not train)
    return ckpt


def check_resume(cfg: DictConfig, job: Job, path: str, ckpt: dict) -> None:
    """A training resume continues a run of this folder, with epochs left to train.

    The checkpoint callbacks find their best checkpoint in this run's folder (never where the
    checkpoint says: dblock.training.checkpoint_io.RunCheckpoint), so a checkpoint of another
    folder would test a best checkpoint that is not there."""
    out_dir = job.out_dir
    file = Path(path)
    if out_dir.resolve() not in file.resolve().parents:
        home = file.parent.parent if file.parent.name == "checkpoints" else file.parent
        raise ConfigError(
            f"ckpt_path={path} is not in this run's folder ({out_dir}); resume it in its own "
            f"folder with hydra.run.dir={home}, or copy that folder (cp -a) and resume the copy "
            "(a resume tests the best checkpoint of its own run)"
        )
    done, max_epochs = int(ckpt["epoch"]) + 1, cfg.trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and done > max_epochs:
        raise ConfigError(
            f"ckpt_path={path} has trained {done} epochs, more than trainer.max_epochs="
            f"{max_epochs}; resume it with trainer.max_epochs={done} or more, or evaluate it "
            "with train=false"
        )


def run_info(cfg: DictConfig, job: Job) -> dict:
    """What the run is, as results.json reports it (the config the checkpoints were checked by)."""
    return {
        "n_classes": cfg.dataset.n_classes,
        "model": cfg.model.model,
        "d": cfg.d if cfg.model.model == "dblock" else None,
        "layers": cfg.layers,
        "n_hidden": cfg.n_hidden,
        "recurrent": cfg.recurrent,
        "detach_recurrent": cfg.detach_recurrent,
        "reduce": cfg.model.reduce,
        "dataset": job.choices.get("dataset"),
        "seed": cfg.seed,
        "smoke": bool(cfg.trainer.get("fast_dev_run")),  # one batch per split: not a result
        "selection": f"{cfg.selection.monitor} ({cfg.selection.mode})",
    }


def tested(path: str | None, ckpt: dict | None) -> dict:
    """Which weights were tested: the checkpoint and the training epochs it had completed."""
    if path is None:
        return {"tested_ckpt": None, "tested_epoch": None}
    return {"tested_ckpt": str(path), "tested_epoch": int(ckpt["epoch"]) + 1 if ckpt else None}


def checkpoint_paths(trainer) -> tuple[str | None, str | None]:
    """(last, best): the newest checkpoint and the best by the selection metric, if written."""
    last = best = None
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None:
            last = callback.best_model_path or last  # top-1 without a monitor: the newest
        else:
            best = callback.best_model_path or best
    return existing(last), existing(best)


def selection_score(trainer, monitor: str) -> float | None:
    """The best value of the selection metric that a checkpoint callback saw, if any."""
    return next(
        (
            float(c.best_model_score)
            for c in trainer.checkpoint_callbacks
            if c.monitor == monitor and c.best_model_score is not None
        ),
        None,
    )


def start_from(cfg: DictConfig, job: Job, task, trainer, ckpt_path: str | None) -> dict | None:
    """Load and check the checkpoint the run starts from (None: from scratch); on a training
    resume, the checkpoint callbacks and the metric history continue from it."""
    try:
        ckpt = load_checkpoint(ckpt_path, task, cfg.train) if ckpt_path is not None else None
        if ckpt is not None and cfg.train:
            check_resume(cfg, job, ckpt_path, ckpt)
    except ConfigError as err:
        if cfg.ckpt_path is None:  # the run dir's own last.ckpt (resume_path)
            raise ConfigError(
                f"{err}; this run dir holds another run: choose another hydra.run.dir, or "
                "train from scratch there with rerun=true (its checkpoints are overwritten)"
            ) from None
        raise
    if cfg.train:
        for callback in trainer.checkpoint_callbacks if ckpt is not None else ():
            callback.resuming = True  # its folder holds the run's checkpoints
        for logger in trainer.loggers:  # the metric history continues at the first epoch now
            if hasattr(logger, "resume_at") and ckpt is not None:
                logger.resume_at(int(ckpt["epoch"]) + 1, ckpt.get("epoch_log"))
            elif hasattr(logger, "resume_at"):
                logger.resume_at(0)
    return ckpt


def last_checkpoint(cfg: DictConfig) -> Path | None:
    """Where the ``checkpoint`` callback writes last.ckpt, or None when it is switched off."""
    c = (cfg.get("callbacks") or {}).get("checkpoint")
    return Path(c.dirpath) / f"{c.filename}.ckpt" if c is not None else None


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint this run starts from: ``ckpt_path``, else the run dir's own last.ckpt.

    Rerunning a command into a run dir that holds a checkpoint (a crash, a kill, a stopped sweep,
    a requeued SLURM job) resumes it, saying so; ``rerun=true`` trains from scratch instead.
    """
    last = last_checkpoint(cfg)
    if cfg.ckpt_path is not None or not cfg.train or cfg.get("rerun") or last is None:
        return cfg.ckpt_path
    if cfg.trainer.get("fast_dev_run") or not last.is_file():
        return None
    epochs = checkpoint_epoch(last)
    saved = f"{epochs} epoch(s) saved" if epochs is not None else "unreadable"
    log.info("resuming from %s (%s; rerun=true trains from scratch)", last, saved)
    return str(last)


def orphan_dirs(datamodule, job: Job) -> list[Path]:
    """Where killed writers may have left temp files: the data dir's dataset folders and the
    run's folder, checkpoint and raster folders (the cache cleans its own folder as it loads)."""
    runs = [job.out_dir, job.out_dir / "checkpoints", job.out_dir / "rasters"]
    return [*runs, *Path(datamodule.data_dir).glob("*/")]


def interrupted(
    cfg: DictConfig, job: Job, stop: SignalStop, start: float, lock, ckpt_path: str | None
) -> dict:
    """results.json of a run stopped by a signal: epochs saved and the command that resumes."""
    last = existing(last_checkpoint(cfg))
    if last is not None and lock is not None and Path(last).stat().st_mtime < lock.mtime:
        last = None  # an older run's file (same filesystem clock as the lock taken at start)
    if ckpt_path is not None and last is None and cfg.train:
        last = existing(ckpt_path)  # stopped before its first checkpoint
    resume = resume_command(
        job.cwd,
        sys.executable,
        sys.argv[0],
        list(job.overrides),
        str(job.out_dir),
        last if cfg.train else None,
        job.config_name,
    )
    return results.summary(
        run_info(cfg, job),
        status="interrupted",
        error=f"interrupted by {stop.name}",
        signal=stop.name,
        epoch=checkpoint_epoch(last) or 0,
        last_ckpt=last,
        resume=resume,
        wall_time_s=time.perf_counter() - start,
    )


def write_config(out_dir: Path, resolved: dict, verbose: bool) -> None:
    """``<run dir>/config.yaml``, the resolved config (atomically); printed with verbose=true."""
    text = OmegaConf.to_yaml(resolved)
    atomic_write(out_dir / "config.yaml", lambda f: f.write(text.encode()))
    if verbose:
        print(text)


def finished(cfg: DictConfig, out_dir: Path, resolved: dict) -> dict | None:
    """The results.json of a job already done as this one would do it (status ok, its
    config.yaml the same settings as this job's, see ``settings``), else None."""
    try:
        done = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("status") != "ok" or done.get("smoke"):
        return None
    if not cfg.train or (done.get("epoch") or 0) < cfg.trainer.max_epochs:
        return None  # an evaluation, or more epochs asked: resume_path continues it
    try:  # the config the job ran with, as this job has it (a search's trial: another lr)
        before = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"))
    except Exception:
        return None
    return done if settings(before) == settings(resolved) else None


def settings(resolved: dict) -> dict:
    """What a job computes from: its resolved config less where data and outputs live and how
    the run reports (paths, data locations, loggers, the progress display, verbose, rerun)."""
    out = {k: v for k, v in resolved.items() if k not in ("paths", "logger", "verbose", "rerun")}
    out["dataset"] = {
        k: v
        for k, v in (resolved.get("dataset") or {}).items()
        if k not in ("data_dir", "cache", "cache_dir", "download")
    }
    out["callbacks"] = {
        k: v for k, v in (resolved.get("callbacks") or {}).items() if k != "progress"
    }
    return out


def write_results(out_dir: Path, summary: dict) -> None:
    """results.json, atomically; a full disk here still reports the run's own status."""
    try:
        write_json(out_dir / "results.json", summary)
    except OSError as err:  # a full disk, a read-only or failing filesystem
        if summary["status"] == "ok" and isinstance(err, DiskFullError):
            raise
        if summary["status"] == "ok":
            raise CheckpointWriteError(out_dir / "results.json", err) from err
        log.error("cannot write %s: %s", out_dir / "results.json", err)
