"""The run's settings, checked before anything starts: every key (``config_keys``), then every
value. ``check_config`` refuses values out of range, naming the option, the bad value and the
allowed ones; ``validate`` runs both on a composed job. Each value rule is its owner's own check
(the d range is ``dblock.functional``'s, the batch format ``datamodules.batches``'), called here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.batches import check_input_format
from dblock.errors import ConfigError, first_line
from dblock.functional import check_d, check_kernel
from dblock.functional.blocks.neurons import KERNELS
from dblock.launch.config_keys import check_keys, known_keys
from dblock.models.classifier import MODELS
from dblock.training.checkpoints import missing_checkpoint
from dblock.values import boolean, is_int, is_number, positive_int


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


MONITORS = ("train/loss", "train/acc", "val/loss", "val/acc")
MODES = ("min", "max")
TEST_CKPTS = ("best", "last")


def _int_at_least(name: str, value, low: int) -> None:
    positive_int(name, value, low, error=ConfigError)


# Every switch: a real boolean or refused (a string such as "maybe" is truthy and would run as
# true). Values: other spellings a key also takes (trainer.deterministic="warn"). "*": each entry.
BOOLEANS: dict[str, tuple] = {
    "recurrent": (),
    "detach_recurrent": (),
    "train": (),
    "verbose": (),
    "model.recurrent": (),
    "model.detach_recurrent": (),
    "dataset.cache": (),
    "dataset.download": (),
    "trainer.deterministic": ("warn",),
    "trainer.enable_model_summary": (),
    "trainer.use_distributed_sampler": (),
    "trainer.enable_checkpointing": (),
    "trainer.enable_progress_bar": (),
    "trainer.benchmark": (),
    "trainer.inference_mode": (),
    "trainer.sync_batchnorm": (),
    "trainer.barebones": (),
    "callbacks.*.save_on_train_epoch_end": (),
    "callbacks.*.auto_insert_metric_name": (),
    "callbacks.*.enable_version_counter": (),
    "callbacks.*.save_weights_only": (),
    "callbacks.*.save_last": ("link",),
    "callbacks.*.verbose": (),
    "logger.*.offline": (),
    "logger.*.log_model": ("all",),
}
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


def _values(cfg: Mapping, path: str):
    """(full key, value) of every key matching ``path`` (``*``: each entry) present in ``cfg``."""
    if not isinstance(cfg, Mapping):
        return
    head, _, rest = path.partition(".")
    keys = [k for k, v in cfg.items() if v is not None] if head == "*" else [head]
    for key in keys:
        if key not in cfg:
            continue
        if not rest:
            yield str(key), cfg[key]
        elif isinstance(cfg[key], Mapping):
            for sub, value in _values(cfg[key], rest):
                yield f"{key}.{sub}", value


def _check_switches(cfg: Mapping) -> None:
    for path, extra in BOOLEANS.items():
        for key, value in _values(cfg, path):
            if value in extra or value is None and path.startswith("trainer."):
                continue  # a documented spelling; None: Lightning's own default
            boolean(key, value, error=ConfigError)


def _positive_number(name: str, value) -> None:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{name}={value!r} is not allowed: {name} must be a finite number > 0"
        )


def _check_training(cfg: Mapping) -> None:
    """The seed and the optimiser's settings, before any data is read."""
    seed = cfg.get("seed")
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"seed={seed!r} is not allowed: seed must be an integer >= 0 (at most {MAX_SEED})"
        )
    task = cfg.get("task") or {}
    for key in ("lr", "gamma"):
        if key in task:
            _positive_number(f"task.{key}", task[key])
    milestones = task.get("milestones", [])
    if not isinstance(milestones, list | tuple) or not all(
        is_int(m) and m >= 1 for m in milestones
    ):
        raise ConfigError(
            f"task.milestones={milestones!r} is not allowed: task.milestones must be a list of "
            "epochs >= 1, e.g. task.milestones=[30,60,90]"
        )


def check_config(cfg: Mapping) -> None:
    """Validate the resolved run config ``cfg`` (a plain dict as composed by ``run.py``)."""
    _check_switches(cfg)
    _check_training(cfg)
    model = cfg.get("model") or {}
    name = model.get("model")
    if name not in MODELS:
        raise ConfigError(
            f"model.model={name!r} is unknown; choose one of: {', '.join(sorted(MODELS))}"
        )
    _int_at_least("layers", model.get("n_layers"), 1)
    _int_at_least("n_hidden", model.get("n_hidden"), 1)
    t_len = (cfg.get("dataset") or {}).get("t_len")
    _int_at_least("dataset.t_len", t_len, 1)
    if name == "dblock":  # the rules are the kernels' own (check_d, check_kernel), named here
        d = model.get("d")
        try:
            check_d(d, t_len)
        except ValueError:
            raise ConfigError(
                f"d={d!r} is not allowed: d must be an integer in 1..T, and T={t_len} "
                f"(dataset.t_len); choose d in 1..{t_len}"
            ) from None
        kernel = model.get("kernel", "auto")
        try:
            check_kernel(kernel)
        except ValueError:
            raise ConfigError(
                f"model.kernel={kernel!r} is unknown; choose one of: {', '.join(KERNELS)}"
            ) from None
        if model.get("chunk") is not None:
            _int_at_least("model.chunk", model.get("chunk"), 1)
    _int_at_least("dataset.batch_size", (cfg.get("dataset") or {}).get("batch_size"), 1)
    try:
        check_input_format((cfg.get("dataset") or {}).get("input", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    if epochs in (None, -1) and trainer.get("max_time") is None:
        raise ConfigError(
            f"trainer.max_epochs={epochs!r} would train until the process is killed; give a "
            "number of epochs >= 1, or a time limit as well: +trainer.max_time=DD:HH:MM:SS"
        )
    if epochs not in (None, -1):
        _int_at_least("trainer.max_epochs", epochs, 1)
    if str(trainer.get("precision")) == "16-true":
        raise ConfigError(
            "trainer.precision=16-true is not supported: float16 weights make Adam's update "
            "NaN (its eps 1e-8 is 0 in float16); use trainer.precision=16-mixed (float32 "
            "weights, float16 projections) or bf16-true"
        )
    selection = cfg.get("selection") or {}
    if selection.get("monitor") not in MONITORS:
        raise ConfigError(
            f"selection.monitor={selection.get('monitor')!r} is unknown; choose one of: "
            f"{', '.join(MONITORS)}"
        )
    if selection.get("mode") not in MODES:
        raise ConfigError(f"selection.mode={selection.get('mode')!r} is unknown; choose min or max")
    if cfg.get("test_ckpt") not in TEST_CKPTS:
        raise ConfigError(f"test_ckpt={cfg.get('test_ckpt')!r} is unknown; choose best or last")
    if not cfg.get("train", True) and not cfg.get("ckpt_path"):
        raise ConfigError("train=false needs ckpt_path=PATH: the checkpoint to evaluate")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(ckpt).is_file():
        raise ConfigError(missing_checkpoint(ckpt))


def check_data_dir(data_dir: str | Path, generated: bool) -> None:
    """A dataset read from files needs an existing ``data_dir``; one that writes its own files
    (``generated``: made on the spot, or downloaded) needs a writable one."""
    path = Path(data_dir)
    if not generated:
        if not path.is_dir():
            raise ConfigError(
                f"paths.data_dir={str(path)!r} does not exist; put the dataset files there, or "
                "point paths.data_dir=DIR (or the environment variable DBLOCK_DATA) at them"
            )
        return
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"paths.data_dir={str(path)!r} cannot be created or written ({existing} is not a "
            "writable directory); set paths.data_dir=DIR or DBLOCK_DATA to a writable directory"
        )


def check_selection(monitor: str, has_val: bool) -> None:
    """The selection metric must exist: ``val/*`` needs a validation split."""
    if monitor.startswith("val/") and not has_val:
        raise ConfigError(
            f"selection.monitor={monitor} needs a validation split, but this dataset has none "
            "(dataset.val_fraction=0); set dataset.val_fraction > 0 or selection.monitor=train/loss"
        )
