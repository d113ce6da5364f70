"""The one entry point: compose -> instantiate -> fit -> test -> results.json.

python run.py                                  # d-block SNN on the embedded dataset
python run.py model=standard                   # the standard recurrent SNN
python run.py model=dblock d=5 layers=2 dataset=shd
python run.py -m d=1,5 layers=1,2              # a sweep: one results.json per job
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import secrets
import shutil
import string
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dblock import files, runner, sweeps
from dblock.config_check import (
    ConfigError,
    check_config,
    check_data_dir,
    check_keys,
    check_selection,
    first_line,
)
from dblock.console import file_log, job_prefix, set_job_label, silence_library_noise
from dblock.runtime import prepare_process
from dblock.task import CheckpointWriteError, NonFiniteError, StopTogether, order_checkpoints

log = logging.getLogger("dblock")
CONF = Path(__file__).resolve().parent / "conf"


def wandb_offline() -> bool:
    """wandb runs offline unless the user is logged in (API key in the environment or netrc)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None
    except (OSError, netrc.NetrcParseError):
        return True


OmegaConf.register_new_resolver("dblock.wandb_offline", wandb_offline, replace=True)


def build(cfg: DictConfig, ckpt_path: str | None = None):
    """Instantiate the datamodule, network, task, loggers, callbacks and trainer from ``cfg``
    (``ckpt_path``: the checkpoint the run starts from, which a wandb run continues)."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset, _convert_="all")
    # generated data, or files that will be downloaded, need only a writable data_dir
    check_data_dir(datamodule.data_dir, datamodule.writes_data_dir())
    check_selection(cfg.selection.monitor, datamodule.has_val)
    task = instantiate(cfg.task, model=instantiate(cfg.model), _convert_="all")
    task.run_config = run_config(cfg)  # stored in every checkpoint, checked on resume / eval
    # an entry set to null (e.g. callbacks.best=null) is switched off
    loggers = [
        instantiate(c, **logger_args(c, cfg, ckpt_path))
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
    if spawns and HydraConfig.get().mode == RunMode.MULTIRUN:
        # Lightning would start each extra process with this command line: the whole sweep again
        raise ConfigError(
            "trainer=ddp inside a -m sweep needs its processes started by SLURM: use "
            "hydra/launcher=submitit_slurm (README, Long runs and clusters), or run the jobs one "
            "at a time without -m"
        )
    return datamodule, task, trainer


def logger_args(entry: DictConfig, cfg: DictConfig, ckpt_path: str | None) -> dict:
    """What run.py adds to a wandb logger: the run dir's run id (a resumed run continues its
    wandb run) and, inside a sweep without an experiment, the sweep's group."""
    if not str(entry.get("_target_", "")).endswith("WandbLogger"):
        return {}
    hc = HydraConfig.get()
    out = {}
    if entry.get("id") is None:
        fresh_start = cfg.train and ckpt_path is None
        out = {"id": wandb_run_id(Path(hc.runtime.output_dir), fresh_start), "resume": "allow"}
    if entry.get("group") is None and hc.mode == RunMode.MULTIRUN:
        out["group"] = sweeps.wandb_group(None, hc.sweep.dir)
    return out


def run_config(cfg: DictConfig) -> dict:
    """The model and dataset settings a checkpoint must match (plain types, see runner)."""
    return {
        "dataset": {
            "name": HydraConfig.get().runtime.choices.get("dataset"),
            **OmegaConf.to_container(cfg.dataset, resolve=True),
        },
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "training": {  # what a resume must not change (runner.TRAINING_KEYS)
            "recipe": HydraConfig.get().runtime.choices.get("recipe"),
            "selection.monitor": cfg.selection.monitor,
            "selection.mode": cfg.selection.mode,
            "task.lr": cfg.task.lr,
            "task.milestones": list(cfg.task.milestones),
            "task.gamma": cfg.task.gamma,
        },
    }


def load_checkpoint(path: str, task, train: bool) -> dict:
    """Load ``path`` safely (tensors and plain types only) and check it fits this run."""
    ckpt = runner.load_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    runner.check_checkpoint(ckpt, path, shapes, task.run_config, evaluate=not train)
    return ckpt


def check_resume(cfg: DictConfig, path: str, ckpt: dict) -> None:
    """A training resume continues a run of this folder, with epochs left to train.

    The checkpoint callbacks find their best checkpoint in this run's folder (never where the
    checkpoint says: dblock.task.RunCheckpoint), so a checkpoint of another folder would test
    a best checkpoint that is not there."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
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


def run_info(cfg: DictConfig) -> dict:
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
        "dataset": HydraConfig.get().runtime.choices.get("dataset"),
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
    return runner.existing(last), runner.existing(best)


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
    epochs = runner.checkpoint_epoch(last)
    saved = f"{epochs} epoch(s) saved" if epochs is not None else "unreadable"
    log.info("resuming from %s (%s; rerun=true trains from scratch)", last, saved)
    return str(last)


def wandb_run_id(out_dir: Path, fresh_start: bool) -> str:
    """The wandb run id of this run dir (``<run dir>/wandb-run-id``), so that a resumed run
    continues the same wandb run; a new one when training starts from scratch."""
    path = out_dir / "wandb-run-id"
    if not fresh_start and path.is_file():
        run_id = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    files.atomic_write(path, lambda f: f.write(f"{run_id}\n".encode()))
    return run_id


def watch_requeue(trainer, stop: runner.SignalStop) -> None:
    """Under SLURM with auto-requeue (Lightning's ``SLURMEnvironment``, on by default), its
    requeue signal (SIGUSR1) stops the run cleanly and requeues the job. Installing the handler
    first keeps Lightning's own one out: that one saves a mid-batch checkpoint (hpc_ckpt_N.ckpt)
    from inside the signal handler, which cannot be resumed exactly."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
        stop.watch_requeue(env.requeue_signal)


def train_and_test(
    cfg: DictConfig, stop: runner.SignalStop, ckpt_path: str | None, checked
) -> dict:
    """Build, check the checkpoint (``checked()`` once it fits: config.yaml is written then),
    fit, test; the run's summary. ``ckpt_path``: the checkpoint the run starts from."""
    start = time.perf_counter()
    datamodule, task, trainer = build(cfg, ckpt_path)
    files.remove_orphans(orphan_dirs(datamodule))
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
        return runner.summary(
            info,
            metrics[0] if metrics else {},
            **tested(ckpt_path, ckpt),
            epoch=int(ckpt["epoch"]) + 1,
            **{"train/epoch_time_s": task.mean_epoch_time()},
            wall_time_s=time.perf_counter() - start,
        )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (NonFiniteError, files.DiskFullError, CheckpointWriteError) as err:
        return runner.summary(
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
    return runner.summary(
        info,
        metrics[0] if metrics else {},
        **tested(path, ckpt),
        selection_score=score,
        epoch=epochs,
        **{"train/epoch_time_s": epoch_time},
        wall_time_s=time.perf_counter() - start,
    )


def orphan_dirs(datamodule) -> list[Path]:
    """Where killed writers may have left temp files: the data dir's dataset folders and the
    run's folder, checkpoint and raster folders (the cache cleans its own folder as it loads)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    runs = [out_dir, out_dir / "checkpoints", out_dir / "rasters"]
    return [*runs, *Path(datamodule.data_dir).glob("*/")]


def interrupted(
    cfg: DictConfig, stop: runner.SignalStop, start: float, lock, ckpt_path: str | None
) -> dict:
    """results.json of a run stopped by a signal: epochs saved and the command that resumes."""
    hc = HydraConfig.get()
    last = runner.existing(last_checkpoint(cfg))
    if last is not None and lock is not None and Path(last).stat().st_mtime < lock.mtime:
        last = None  # an older run's file (same filesystem clock as the lock taken at start)
    if ckpt_path is not None and last is None and cfg.train:
        last = runner.existing(ckpt_path)  # stopped before its first checkpoint
    resume = runner.resume_command(
        hc.runtime.cwd,
        sys.executable,
        sys.argv[0],
        list(hc.overrides.task),
        hc.runtime.output_dir,
        last if cfg.train else None,
        hc.job.config_name,
    )
    return runner.summary(
        run_info(cfg),
        status="interrupted",
        error=f"interrupted by {stop.name}",
        signal=stop.name,
        epoch=runner.checkpoint_epoch(last) or 0,
        last_ckpt=last,
        resume=resume,
        wall_time_s=time.perf_counter() - start,
    )


def skipped_jobs() -> str:
    """Which jobs of a -m sweep did not run because this one was interrupted."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    jobs = sweep_jobs()
    num = hc.job.num
    if jobs is None:
        return f"; the sweep stops: the jobs after job {num} did not run"
    rest = jobs[num + 1 :]
    if not rest:
        return "; it was the sweep's last job"
    listed = ", ".join(f"#{num + 1 + i} ({' '.join(o)})" for i, o in enumerate(rest))
    return f"; the sweep stops: {len(rest)} job(s) did not run: {listed}"


def sweep_jobs() -> list[list[str]] | None:
    """The overrides of every job of this sweep, as Hydra's basic sweeper splits them (None
    with another sweeper)."""
    hc = HydraConfig.get()
    basic = str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper")
    if not basic or not str(hc.launcher.get("_target_", "")).endswith("BasicLauncher"):
        return None  # another sweeper, or jobs run in parallel
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()]
        argv = [a for a in sys.argv[1:] if not a.startswith(("-", "hydra.", "hydra/"))]
        overrides = parser.parse_overrides(params) + parser.parse_overrides(argv)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # a sweep Hydra ran but we cannot re-split: say less
        return None
    return [list(job) for batch in batches for job in batch]


_KNOWN: list = []  # known_keys(), once per process (a plain list: joblib pickles main by value)


def known_keys() -> tuple[frozenset[str], dict[str, frozenset[str]], dict[str, dict], set]:
    """The keys conf/ defines: at the top level, and inside nodes without a ``_target_``.

    Top level: config.yaml's keys, the groups that fill a key of their own name (model,
    dataset, ...), and the keys that ``@package _global_`` files set (experiment/, recipe/ ...).
    Inside a plain node (``selection``, ``paths``): the keys its files define. Nodes with a
    ``_target_`` are checked against the target's arguments instead (config_check.check_keys);
    the third item gives, per group, the keys each option's file defines (for the message);
    the fourth names the groups whose entries are objects to create (callbacks, logger).
    """
    if _KNOWN:
        return _KNOWN[0]
    main = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    top = {k for k in main if k != "defaults"}
    plain = {k: set(v) for k, v in main.items() if isinstance(v, dict) and "_target_" not in v}
    options: dict[str, dict] = {}
    collections = set()
    for group in (p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for file in group.glob("*.yaml"):
            node = OmegaConf.to_container(OmegaConf.load(file)) or {}
            keys = {k for k in node if k not in ("defaults", "hydra")}
            if re.search(r"^#\s*@package\s+_global_", file.read_text(), re.M):
                top |= keys
                continue
            top.add(group.name)
            entries = all(isinstance(v, dict | None) for v in node.values())  # callbacks, logger
            if "_target_" in node or entries:
                options.setdefault(group.name, {})[file.stem] = keys
                if "_target_" not in node:
                    collections.add(group.name)
            else:
                plain.setdefault(group.name, set()).update(keys)  # e.g. paths
    _KNOWN.append(
        (frozenset(top), {k: frozenset(v) for k, v in plain.items()}, options, collections)
    )
    return _KNOWN[0]


def validate(cfg: DictConfig) -> dict:
    """Check a job's config (without its ``hydra`` node): keys first, since a misspelt key
    explains a wrong value; then the values. Returns the resolved config."""
    check_keys(OmegaConf.to_container(cfg, resolve=False), *known_keys())
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # a missing environment variable, a bad interpolation
        raise ConfigError(f"the config cannot be resolved: {first_line(err)}") from None
    check_config(resolved)
    return resolved


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
        and not (out_dir / files.RunLock.NAME).exists()  # another run's (ours is released)
        and out_dir not in (Path.cwd(), *Path.cwd().parents)
    ):
        shutil.rmtree(out_dir, ignore_errors=True)
    fail(message, out_dir=out_dir)


def write_config(out_dir: Path, resolved: dict, verbose: bool) -> None:
    """``<run dir>/config.yaml``, the resolved config (atomically); printed with verbose=true."""
    text = OmegaConf.to_yaml(resolved)
    files.atomic_write(out_dir / "config.yaml", lambda f: f.write(text.encode()))
    if verbose:
        print(text)


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
        lock = files.RunLock(out_dir) if rank0 else None
        with lock or nullcontext(), runner.SignalStop() as stop:

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
    except (files.DiskFullError, CheckpointWriteError) as err:
        fail(str(err), code=3, out_dir=out_dir)
    except Exception as err:  # a crash: Hydra prints the traceback, the run's log keeps a line
        file_log.error("%s: %s", type(err).__name__, first_line(err))
        raise
    finish_wandb()
    if summary["status"] == "interrupted":  # also stops a -m sweep: say which jobs did not run
        message = f"{summary['error']} after {summary['epoch']} saved epoch(s)"
        if stop.requeue and rank0 and runner.requeue_slurm_job():
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
        line = runner.one_line(summary, str(out_dir), trained=cfg.train)
        print(job_prefix() + line)
        file_log.info(line)
    return summary.get(cfg.objective)  # what a sweeper such as Optuna optimises


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


def parallel_job_label() -> str:
    """The label of this job when a sweep's jobs run side by side (any launcher but Hydra's
    basic one, which runs them one after another): its folder's name, which names it by the
    values it sweeps (``dataset.n_train=256``) or its number. Empty otherwise."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or str(hc.launcher.get("_target_", "")).endswith(
        "BasicLauncher"
    ):
        return ""
    return Path(hc.runtime.output_dir).name


def write_results(out_dir: Path, summary: dict) -> None:
    """results.json, atomically; a full disk here still reports the run's own status."""
    try:
        files.write_json(out_dir / "results.json", summary)
    except OSError as err:  # a full disk, a read-only or failing filesystem
        if summary["status"] == "ok" and isinstance(err, files.DiskFullError):
            raise
        if summary["status"] == "ok":
            raise CheckpointWriteError(out_dir / "results.json", err) from err
        log.error("cannot write %s: %s", out_dir / "results.json", err)


def finish_wandb() -> None:
    """Close the wandb run, if any: one wandb run per job, also inside a multirun."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


if __name__ == "__main__":
    from preflight import check_choices, preflight

    try:  # every error in the settings before Hydra creates a folder or prints a line
        check_choices(sys.argv[1:])
        sys.argv += preflight(sys.argv[1:], validate, known_keys)
    except ConfigError as err:
        fail(str(err))
    except Exception:  # a case the early check does not know: Hydra and main() still check
        pass
    main()
