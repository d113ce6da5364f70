"""Checks a run's settings before anything starts: one clear message naming the option.

Works on plain dicts (the resolved config), so it imports neither hydra nor omegaconf.
Every failure raises ``ConfigError`` (a ``ValueError``) whose message names the option, the bad
value and the allowed values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dblock.functional.block import KERNELS
from dblock.models.classifier import MODELS

MONITORS = ("train/loss", "train/acc", "val/loss", "val/acc")
MODES = ("min", "max")
TEST_CKPTS = ("best", "last")


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names it and the allowed values."""


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is not allowed: {name} must be an integer >= {low}")


def check_config(cfg: Mapping) -> None:
    """Validate the resolved run config ``cfg`` (a plain dict as composed by ``run.py``)."""
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
    if name == "dblock":
        d = model.get("d")
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= t_len:
            raise ConfigError(
                f"d={d!r} is not allowed: d must be an integer in 1..T, and T={t_len} "
                f"(dataset.t_len); choose d in 1..{t_len}"
            )
        kernel = model.get("kernel", "auto")
        if kernel not in KERNELS:
            raise ConfigError(
                f"model.kernel={kernel!r} is unknown; choose one of: {', '.join(KERNELS)}"
            )
        if model.get("chunk") is not None:
            _int_at_least("model.chunk", model.get("chunk"), 1)
    _int_at_least("dataset.batch_size", (cfg.get("dataset") or {}).get("batch_size"), 1)
    epochs = (cfg.get("trainer") or {}).get("max_epochs")
    if epochs is not None and epochs != -1:
        _int_at_least("trainer.max_epochs", epochs, 1)
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
