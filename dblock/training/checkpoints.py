"""Checkpoints as data: a weights-only load of a local file with clear refusals, and the
checks that a checkpoint fits the run (model, data, seed; on resume, the training settings).
Plain torch: ``dblock.load_model`` reads checkpoints through it without Lightning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

from dblock.errors import ConfigError

log = logging.getLogger(__name__)



def missing_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint file before it is opened, or None when it can.

    Checkpoints are local files: a URL is never fetched (Lightning would download it and unpickle
    it with ``weights_only=False``), a directory is named as one."""
    text = str(path)
    if "://" in text:
        return (
            f"ckpt_path={text} is a URL; dblock loads checkpoints only from local files "
            "(download it yourself if you trust its source, then give the file's path)"
        )
    file = Path(path)
    if file.is_dir():
        found = [file / n for n in ("last.ckpt", "checkpoints/last.ckpt") if (file / n).is_file()]
        example = f"ckpt_path={found[0]}" if found else "a run's checkpoints/last.ckpt or best.ckpt"
        return f"ckpt_path={text} is a directory; give the checkpoint file in it ({example})"
    if not file.is_file():
        return f"ckpt_path={text} does not exist; give the path of a .ckpt file"
    return None


# --- checkpoints ----------------------------------------------------------------------------

# what a checkpoint's dataset settings may differ in: where the data live, and how they load
LOCATION_KEYS = {"data_dir", "cache", "cache_dir", "download", "batch_size", "input"}
EVAL_FREE_KEYS = {"val_fraction", "split_seed"}  # evaluation reads the test split only
SHORT = {  # the short top-level knobs the user types
    "model.model": "model",
    "model.d": "d",
    "model.n_layers": "layers",
    "model.n_hidden": "n_hidden",
    "model.recurrent": "recurrent",
    "model.detach_recurrent": "detach_recurrent",
    "dataset.name": "dataset",
}


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` of a local file: tensors and plain types only.

    A URL, a directory, a missing, truncated, foreign or unsafe file is a ``ConfigError`` naming
    it. Every checkpoint dblock reads goes through here (``AtomicCheckpointIO.load_checkpoint``
    routes Lightning's own loads here too).
    """
    import torch

    why = missing_checkpoint(path)
    if why is not None:
        raise ConfigError(why)
    file = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ConfigError(
            f"ckpt_path={path} cannot be loaded as a checkpoint ({_why(err, file)})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path} is not a dblock checkpoint (no state_dict)")
    return ckpt


def _is_torch_file(file: Path) -> bool:
    """Whether ``file`` starts as a file ``torch.save`` writes: a zip archive, or a pickle
    (protocol 2-5: torch's legacy format, and what a tampered file holds)."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")


def _why(err: Exception, file: Path) -> str:
    """The reason in a torch.load error, without its advice to load with weights_only=False."""
    if not _is_torch_file(file):
        return (
            "it is not a checkpoint: corrupt, or another kind of file (a PyTorch checkpoint is a "
            "zip archive)"
        )
    text = str(err)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = next((r.strip() for r in reason if r.strip()), "")[:160]
        return (
            "it holds Python objects other than tensors and plain types, which a dblock "
            f"checkpoint never does: foreign or tampered with{f'; {detail}' if detail else ''}"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"corrupt, truncated or not a dblock checkpoint: {first[:200]}"


def check_checkpoint(
    ckpt: dict,
    path: str | Path,
    shapes: Mapping[str, tuple],
    config: Mapping | None,
    evaluate: bool,
) -> None:
    """Refuse a checkpoint that does not fit this run, with one message naming the key.

    ``config`` is this run's ``{"dataset": {...}, "model": {...}, "seed": int}`` as stored by
    ``SNNTask.on_save_checkpoint`` (key ``dblock_config``); ``shapes`` the task's state-dict
    shapes. ``evaluate`` (train=false) allows another validation split and seed.
    """
    stored = ckpt.get("dblock_config")
    if config is not None and isinstance(stored, Mapping):
        key, old, new = first_mismatch(stored, config, evaluate)
        if key is not None:
            flag = SHORT.get(key, key)
            if key in TRAINING_KEYS:
                raise ConfigError(training_mismatch(path, key, old, new))
            raise ConfigError(
                f"ckpt_path={path} was written with {key}={fmt(old)}, this run has "
                f"{key}={fmt(new)}; {'evaluate' if evaluate else 'resume'} it with "
                f"{flag}={fmt(old)} (the checkpoint's model and data must match the run)"
            )
    elif config is not None:
        log.warning("%s stores no run config (older dblock); only tensor shapes are checked", path)
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    want = {k: tuple(v) for k, v in shapes.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        k = diff[0]
        raise ConfigError(
            f"ckpt_path={path} does not fit this config (model, d, layers, n_hidden, recurrent, "
            f"dataset must match the run that wrote it): {k} is {got.get(k)} in the checkpoint, "
            f"{want.get(k)} here"
        )


def first_mismatch(stored: Mapping, current: Mapping, evaluate: bool):
    """(key, stored value, current value) of the first difference that matters, or Nones."""
    free = LOCATION_KEYS | (EVAL_FREE_KEYS if evaluate else set())
    old_data, new_data = stored.get("dataset") or {}, current.get("dataset") or {}
    # the dataset's name first: its other settings differ because the dataset does
    for k in sorted(set(old_data) | set(new_data), key=lambda k: (k != "name", k)):
        if k not in free and old_data.get(k) != new_data.get(k):
            return f"dataset.{k}", old_data.get(k), new_data.get(k)
    old_model, new_model = stored.get("model") or {}, current.get("model") or {}
    ignore = {"d"} if old_model.get("model") == new_model.get("model") == "standard" else set()
    for k in sorted(set(old_model) | set(new_model)):
        if k not in ignore and old_model.get(k) != new_model.get(k):
            return f"model.{k}", old_model.get(k), new_model.get(k)
    if not evaluate and stored.get("seed") != current.get("seed"):
        return "seed", stored.get("seed"), current.get("seed")
    old_train, new_train = stored.get("training"), current.get("training") or {}
    if not evaluate and isinstance(old_train, Mapping):  # absent in older checkpoints
        for k in TRAINING_KEYS:
            if k in old_train and old_train[k] != new_train.get(k):
                return k, old_train[k], new_train.get(k)
    return None, None, None


# what a resume cannot change: Lightning restores the optimiser, the lr scheduler (its lr,
# milestones and gamma) and each checkpoint callback's selection state from the checkpoint, so
# a new value would be ignored while config.yaml recorded it (the recipe first: it sets others)
TRAINING_KEYS = (
    "recipe",
    "selection.monitor",
    "selection.mode",
    "task.lr",
    "task.milestones",
    "task.gamma",
)


def training_mismatch(path, key: str, old, new) -> str:
    """The refusal of a resume with another training setting than its checkpoint's."""
    if key == "recipe":
        fix = f"recipe={old}" if old is not None else f"without recipe={new}"
        fix = f"with {fix}" if old is not None else fix
    else:
        fix = f"with {key}={fmt(old)}"
    return (
        f"ckpt_path={path} was trained with {key}={fmt(old)}, this run has {key}={fmt(new)}; "
        f"resume it {fix} (a resume continues the training it resumes; to train with other "
        "settings, start a new run in another hydra.run.dir)"
    )


def fmt(value) -> str:
    """A value as a Hydra override would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)


def checkpoint_epoch(path: str | Path | None) -> int | None:
    """Epochs completed in the checkpoint at ``path``; None when absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return int(load_checkpoint(path)["epoch"]) + 1
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
