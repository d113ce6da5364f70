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
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dblock.config_check import ConfigError, check_config, check_data_dir, check_selection
from dblock.runtime import prepare_process
from dblock.task import NonFiniteError

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


def build(cfg: DictConfig):
    """Instantiate the datamodule, network, task, loggers, callbacks and trainer from ``cfg``."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset, _convert_="all")
    # generated data, or files that will be downloaded, need only a writable data_dir
    creates = getattr(datamodule, "generated", False) or getattr(datamodule, "download", False)
    check_data_dir(datamodule.data_dir, creates)
    check_selection(cfg.selection.monitor, datamodule.has_val)
    task = instantiate(cfg.task, model=instantiate(cfg.model), _convert_="all")
    # an entry set to null (e.g. callbacks.best=null) is switched off
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:  # the resolved config, e.g. as the wandb run's config
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
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


def load_checkpoint(path: str, task) -> dict:
    """Load ``path`` safely (tensors and plain types only) and check it fits ``task``."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"ckpt_path={path} cannot be loaded as a checkpoint (corrupt, truncated or not a "
            f"dblock checkpoint: {first[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path} is not a dblock checkpoint (no state_dict)")
    want = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        k = diff[0]
        raise ConfigError(
            f"ckpt_path={path} does not fit this config (model, d, layers, n_hidden, recurrent, "
            f"dataset must match the run that wrote it): {k} is {got.get(k)} in the checkpoint, "
            f"{want.get(k)} here"
        )
    return ckpt


def results(cfg: DictConfig, test: dict, **extra) -> dict:
    """The run's summary as written to results.json."""
    return {
        "status": "ok",
        "test/acc": test.get("test/acc"),
        "test/loss": test.get("test/loss"),
        "test/spikes_per_sample": test.get("test/spikes_per_sample"),
        "test/samples": int(test["test/samples"]) if "test/samples" in test else None,
        **extra,
        "n_classes": cfg.dataset.n_classes,
        "model": cfg.model.model,
        "d": cfg.d if cfg.model.model == "dblock" else None,
        "layers": cfg.layers,
        "n_hidden": cfg.n_hidden,
        "recurrent": cfg.recurrent,
        "detach_recurrent": cfg.detach_recurrent,
        "dataset": HydraConfig.get().runtime.choices.get("dataset"),
        "seed": cfg.seed,
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
    return last, best


def train_and_test(cfg: DictConfig, out_dir: Path) -> dict:
    start = time.perf_counter()
    datamodule, task, trainer = build(cfg)
    ckpt = load_checkpoint(cfg.ckpt_path, task) if cfg.ckpt_path is not None else None
    if not cfg.train:
        metrics = trainer.test(
            task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False, weights_only=True
        )
        return results(
            cfg,
            metrics[0] if metrics else {},
            **tested(cfg.ckpt_path, ckpt),
            epoch=int(ckpt["epoch"]) + 1,
            **{"train/epoch_time_s": task.mean_epoch_time()},
            wall_time_s=time.perf_counter() - start,
        )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except NonFiniteError as err:
        summary = results(
            cfg,
            {},
            epoch=trainer.current_epoch,
            last_good_ckpt=checkpoint_paths(trainer)[0],
            **{"train/epoch_time_s": task.mean_epoch_time()},
            wall_time_s=time.perf_counter() - start,
        )
        return {**summary, "status": "failed", "error": str(err)}
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
    ckpt = load_checkpoint(path, task) if path else None
    metrics = trainer.test(
        task, datamodule=datamodule, ckpt_path=path, verbose=False, weights_only=True
    )
    return results(
        cfg,
        metrics[0] if metrics else {},
        **tested(path, ckpt),
        selection_score=score,
        epoch=epochs,
        **{"train/epoch_time_s": epoch_time},
        wall_time_s=time.perf_counter() - start,
    )


def one_line(summary: dict, out_dir: str) -> str:
    d = f" d={summary['d']}" if summary["d"] is not None else ""
    epoch_s = summary["train/epoch_time_s"]
    return (
        f"{summary['model']}{d} layers={summary['layers']} "
        f"{'recurrent' if summary['recurrent'] else 'feedforward'} on {summary['dataset']}: "
        f"test acc {summary['test/acc']:.4f}, loss {summary['test/loss']:.4f}, "
        f"{summary['test/spikes_per_sample']:.1f} spikes/sample, "
        f"{epoch_s if epoch_s is not None else float('nan'):.2f} s/epoch, "
        f"{summary['epoch']} epochs -> {out_dir}/results.json"
    )


def check_choices(argv: list[str]) -> None:
    """Unknown config-group options (``model=foo``) as one line, before Hydra composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-")]
        )
    except Exception:
        return  # Hydra reports syntax errors itself
    for override in overrides:
        group = override.key_or_group
        if group not in groups or override.is_delete() or override.package is not None:
            continue
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for value in values:
            if isinstance(value, str) and value not in options and value != "null":
                raise ConfigError(
                    f"{group}={value} is unknown; choose one of: {', '.join(options)}"
                )


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    prepare_process()  # allocator tuned for large CPU tensors; a hint when the CPU is busy

    if rank_zero_only.rank == 0:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_config(OmegaConf.to_container(cfg, resolve=True))
        summary = train_and_test(cfg, out_dir)
    except (ValueError, InstantiationException, FileNotFoundError) as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        fail(str(cause))
    if rank_zero_only.rank == 0:  # one results.json per run, also under DDP
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    finish_wandb()
    if summary["status"] != "ok":
        message = f"{summary['error']} (results.json: {out_dir}/results.json)"
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep's other jobs still run
            print(f"error: {message}", file=sys.stderr)
            return None
        fail(message, code=3)
    if rank_zero_only.rank == 0:
        print(one_line(summary, str(out_dir)))
    return summary.get(cfg.objective)  # what a sweeper such as Optuna optimises


def finish_wandb() -> None:
    """Close the wandb run, if any: one wandb run per job, also inside a multirun."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    main()
