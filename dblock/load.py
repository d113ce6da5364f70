"""Load a trained network from a checkpoint alone: ``dblock.load_model(path)``.

A checkpoint written by ``run.py`` stores the run's model and dataset settings (key
``dblock_config``, see ``SNNTask.on_save_checkpoint``), so the network is rebuilt from the file
itself, without Hydra or the config files. The file is read with
``torch.load(weights_only=True)``: tensors and plain types only, never code; a checkpoint of
another kind is refused with one line naming the file and what is missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch

from dblock.errors import ConfigError
from dblock.models import SNNClassifier
from dblock.training.checkpoints import load_checkpoint

# the model targets a checkpoint may name: the classifier is rebuilt from this list, never from
# the string in the file (a checkpoint is data, not code to import)
TARGETS = ("dblock.models.SNNClassifier", "dblock.models.classifier.SNNClassifier")
PREFIX = "model."  # SNNTask keeps the network as ``self.model``


def stored_config(ckpt: Mapping, path: str | Path) -> dict:
    """The checkpoint's ``dblock_config`` (``{"dataset": {...}, "model": {...}, "seed": int}``);
    ``ConfigError`` when it has none (another program's checkpoint, or an older dblock's)."""
    config = ckpt.get("dblock_config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ConfigError(
            f"{path} is not a dblock run checkpoint: it stores no model settings (dblock_config); "
            "only checkpoints written by run.py can be loaded by themselves"
        )
    return dict(config)


def model_arguments(model_config: Mapping, path: str | Path) -> dict:
    """The ``SNNClassifier`` arguments in a checkpoint's model settings (``_target_`` checked
    against ``TARGETS``; a key the classifier does not take is refused)."""
    target = model_config.get("_target_", TARGETS[0])
    if target not in TARGETS:
        raise ConfigError(
            f"{path} was written for the model {target!r}; dblock.load_model rebuilds only "
            f"{TARGETS[0]}"
        )
    allowed = set(inspect.signature(SNNClassifier).parameters)
    args = {k: v for k, v in model_config.items() if k != "_target_"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ConfigError(
            f"{path} stores model settings this dblock does not know ({', '.join(unknown)}); "
            "it was written by another version of dblock"
        )
    return args


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> SNNClassifier:
    """The trained classifier in a ``run.py`` checkpoint, in eval mode, ready to use.

    Args:
        path: a local ``.ckpt`` file written by ``run.py`` (``last.ckpt``, ``best.ckpt``, ...).
        map_location: the device the weights are put on (default the CPU).

    Returns:
        ``SNNClassifier`` in eval mode. Its settings are readable: ``net.config`` (the
        constructor arguments: ``model``, ``d``, ``n_layers``, ``n_hidden``, ``t_len`` ...),
        ``net.run_config`` (the run's stored model, dataset and seed settings) and
        ``net.epochs`` (training epochs completed when the file was written). The network
        takes time-major (T, B, n_in) input and returns ``Output(logits, spikes)``.

    Raises:
        ConfigError (a ``ValueError``): a missing, truncated or foreign file, or one that holds
            anything but tensors and plain types, with one line naming the file.
    """
    ckpt = load_checkpoint(path)
    config = stored_config(ckpt, path)
    net = SNNClassifier(**model_arguments(config["model"], path))
    state = {
        k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)
    }
    want = net.state_dict()
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        diff = sorted(set(state) ^ set(want))
        diff = diff or [k for k in want if state[k].shape != want[k].shape]
        raise ConfigError(
            f"{path}: its weights do not fit the model settings it stores ({diff[0]}); the file "
            "was altered or written by another version of dblock"
        )
    net.load_state_dict(state)
    net.run_config = config
    net.epochs = int(ckpt["epoch"]) + 1 if isinstance(ckpt.get("epoch"), int) else None
    return net.to(map_location).eval()
