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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dblock")


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
    task = instantiate(cfg.task, model=instantiate(cfg.model), _convert_="all")
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    for logger in loggers:  # the resolved config, e.g. as the wandb run's config
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return datamodule, task, trainer


def results(cfg: DictConfig, task, trainer, test: dict, wall_s: float) -> dict:
    """The run's summary as written to results.json."""
    return {
        "test/acc": test.get("test/acc"),
        "test/loss": test.get("test/loss"),
        "test/spikes_per_sample": test.get("test/spikes_per_sample"),
        "train/epoch_time_s": task.mean_epoch_time(),
        "epoch": trainer.current_epoch,
        "n_classes": cfg.dataset.n_classes,
        "model": cfg.model.model,
        "d": cfg.d if cfg.model.model == "dblock" else None,
        "layers": cfg.layers,
        "n_hidden": cfg.n_hidden,
        "recurrent": cfg.recurrent,
        "detach_recurrent": cfg.detach_recurrent,
        "dataset": HydraConfig.get().runtime.choices.get("dataset"),
        "seed": cfg.seed,
        "wall_time_s": wall_s,
    }


def train_and_test(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule, task, trainer = build(cfg)
    if cfg.train:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = trainer.test(task, datamodule=datamodule, verbose=False)
    else:
        if cfg.ckpt_path is None:
            raise ValueError("train=false needs ckpt_path=PATH: the checkpoint to evaluate")
        metrics = trainer.test(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False)
    summary = results(cfg, task, trainer, metrics[0] if metrics else {}, time.perf_counter() - start)
    if trainer.is_global_zero:
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for logger in trainer.loggers:  # one wandb run per job, also inside a multirun
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    return summary


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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = train_and_test(cfg)
    except (ValueError, InstantiationException, FileNotFoundError) as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    print(one_line(summary, out_dir))
    return summary["test/acc"]


if __name__ == "__main__":
    main()
