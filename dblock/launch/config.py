"""The run's settings, checked before anything starts: every key, then every value.

``known_keys`` reads the keys ``conf/`` defines; ``check_keys`` refuses a key that nothing reads
(a misspelt option would otherwise be silently ignored); ``check_config`` refuses values out of
range, naming the option, the bad value and the allowed ones; ``validate`` runs both on a composed
job. Each value rule is the owner's own check (the d range is ``dblock.functional``'s), called here.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.batches import check_input_format
from dblock.errors import ConfigError, first_line
from dblock.functional import check_d, check_kernel
from dblock.functional.blocks.neurons import KERNELS
from dblock.models.classifier import MODELS
from dblock.training.checkpoints import missing_checkpoint
from dblock.values import boolean, is_int, is_number, positive_int

CONF = Path(__file__).resolve().parents[2] / "conf"  # the repo's Hydra config groups


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


# --- unknown keys ------------------------------------------------------------------------------

# keys that instantiate() itself reads from a node with a _target_
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


def check_keys(
    cfg: Mapping,
    top: Iterable[str],
    plain: Mapping[str, Iterable[str]],
    options: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
    collections: Iterable[str] = (),
) -> None:
    """Refuse keys that nothing reads: a misspelt option would otherwise be silently ignored.

    ``top``: the keys allowed at the top level; ``plain``: for top-level nodes without a
    ``_target_`` (``selection``, ``paths``), the keys allowed inside. Every node with a
    ``_target_`` (model, dataset, task, trainer, each callback and logger) may hold the keyword
    arguments of that target (``accepted_keywords``). ``hydra`` is Hydra's and is not checked.
    ``options``: for a config group, the keys each of its options defines, to say which option
    a key belongs to (``dataset.n_train`` is bursts'). ``collections``: nodes whose entries are
    each an object to create (``callbacks``, ``logger``): an entry needs a ``_target_`` (or is
    null, switched off). Raises ``ConfigError`` naming the key.
    """
    _unknown("", [k for k in cfg if k != "hydra"], set(top), nested=cfg)
    for name, keys in plain.items():
        node = cfg.get(name)
        if isinstance(node, Mapping) and "_target_" not in node:
            _unknown(name, list(node), set(keys))
    for name in collections:  # callbacks, logger: each entry is created from its _target_
        for key, entry in (cfg.get(name) or {}).items():
            if entry is not None and not (isinstance(entry, Mapping) and "_target_" in entry):
                owner = [o for o, keys in (options or {}).get(name, {}).items() if key in keys]
                fix = (
                    f"choose {' or '.join(f'{name}={o}' for o in owner)}"
                    if owner
                    else (f"give +{name}.{key}._target_=CLASS, or set {name}.{key}=null")
                )
                raise ConfigError(f"{name}.{key} has no _target_, so nothing reads it; {fix}")
    for path, node in _target_nodes(cfg):
        accepted = accepted_keywords(node["_target_"])
        if accepted is not None:
            owners = {
                key: [name for name, keys in (options or {}).get(path, {}).items() if key in keys]
                for key in node
            }
            where = f" of {node['_target_']}"
            _unknown(path, list(node), accepted | INSTANTIATE_KEYS, where, owners)


def _target_nodes(node: Mapping, path: str = ""):
    """(path, node) for every mapping with a ``_target_`` under ``node``, ``hydra`` excluded."""
    if "_target_" in node and isinstance(node["_target_"], str):
        yield path, node
    for key, value in node.items():
        if isinstance(value, Mapping) and not (path == "" and key == "hydra"):
            yield from _target_nodes(value, f"{path}.{key}" if path else str(key))


def _unknown(
    path: str,
    keys: list,
    known: set[str],
    where: str = "",
    owners: Mapping | None = None,
    nested: Mapping | None = None,
) -> None:
    """Refuse the first of ``keys`` not in ``known``, suggesting the key meant: the group option
    that has it (``owners``), a key of the config that ends the same (``nested``: ``lr`` ->
    ``task.lr``), or a close spelling."""
    for key in keys:
        if key in known:
            continue
        full = f"{path}.{key}" if path else str(key)
        owner = (owners or {}).get(key)
        if owner:
            choices = " and ".join(f"{path}={name}" for name in owner)
            raise ConfigError(f"{full} is not a setting{where}; only {choices} has it")
        inside = sorted(_ending_in(nested, str(key))) if nested is not None else []
        if inside:
            meant = " or ".join(f"`{k}`" for k in inside)
            raise ConfigError(f"{full} is not a setting{where}; did you mean {meant}?")
        close = difflib.get_close_matches(str(key), sorted(known - INSTANTIATE_KEYS), n=1)
        hint = (
            f"did you mean `{f'{path}.{close[0]}' if path else close[0]}`?"
            if close
            else f"known {'keys of ' + path if path else 'top-level keys'}: "
            + ", ".join(sorted(k for k in known if not k.startswith("_")))
        )
        raise ConfigError(f"{full} is not a setting{where}; {hint}")


def _ending_in(cfg: Mapping, name: str, path: str = ""):
    """The full keys below the top level of ``cfg`` whose last part is ``name`` (not hydra's)."""
    for key, value in cfg.items():
        full = f"{path}.{key}" if path else str(key)
        if path and key == name:
            yield full
        if isinstance(value, Mapping) and full != "hydra" and full != name:
            yield from _ending_in(value, name, full)


def accepted_keywords(target: str) -> set[str] | None:
    """The keyword arguments the callable at dotted path ``target`` accepts, or None if any.

    A class's ``__init__`` that passes ``**kwargs`` on to ``super().__init__`` accepts its base
    classes' arguments too, so those are collected along the MRO. Keywords taken by ``**kwargs``
    that go anywhere else (e.g. a wrapped library's options), and targets that cannot be
    imported or inspected, give None: nothing is refused (instantiation reports those).
    """
    try:
        return _accepted(target)
    except Exception:  # an unimportable target is reported by instantiate()
        return None


@cache
def _accepted(target: str) -> frozenset[str] | None:
    obj = _locate(target)
    chain = (
        [c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__]
        if inspect.isclass(obj)
        else [obj]
    )
    names: set[str] = set()
    for func in chain:
        if func is object.__init__:
            return frozenset(names)
        params = inspect.signature(func).parameters.values()
        names |= {
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        var = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
        if var is None:
            return frozenset(names)
        if not _passes_on(func, var):
            return None
    return None


def _passes_on(func, var: str) -> bool:
    """Does ``func`` hand ``**var`` on to ``super().__init__(...)``?"""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(func))))
    for call in ast.walk(tree):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "__init__"
            and isinstance(call.func.value, ast.Call)
            and getattr(call.func.value.func, "id", None) == "super"
            and any(k.arg is None and getattr(k.value, "id", None) == var for k in call.keywords)
        ):
            return True
    return False


def _locate(path: str):
    """The object at dotted ``path`` (``package.module.Class``), imported."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    return importlib.import_module(path)
