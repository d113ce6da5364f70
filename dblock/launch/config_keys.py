"""Keys that nothing reads are refused: a misspelt option would otherwise be silently ignored.

``known_keys`` reads the keys ``conf/`` defines (top level, plain nodes, each group's options);
a node with a ``_target_`` may hold that target's keyword arguments (``accepted_keywords``, read
from its signature); ``check_keys`` refuses anything else with a suggestion.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from dblock.errors import ConfigError

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
