"""What run.py checks before Hydra starts, so a bad setting stops before a folder or a line.

``check_choices``: unknown config-group options (``model=dblok``). ``preflight``: every job's
config composed as Hydra will compose it (each job of a plain ``-m`` sweep too) and checked by
``dblock.launch.config.validate`` (unknown keys, then values); it also names a sweep's job
folders by the values they sweep. Only run.py's ``__main__`` uses this module (the jobs
themselves, also in other processes, check their config again in ``main``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dblock.errors import ConfigError, first_line
from dblock.launch.config import validate
from dblock.launch.config_keys import CONF, check_keys, known_keys

MULTIRUN_FLAGS = ("-m", "--multirun")
SAFE_NAME = re.compile(r"[A-Za-z0-9+][A-Za-z0-9._,=+-]{0,199}")  # no /, no spaces, no quotes


def check_choices(argv: list[str]) -> None:
    """Unknown config-group options (``model=foo``) as one line, before Hydra composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-")]
        )
    except Exception:
        return  # preflight() reports syntax errors
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
            if group == "experiment" and re.fullmatch(r"fig3[a-d]", str(value)):
                raise ConfigError(fig3_is_a_benchmark(value))
            if isinstance(value, str) and value not in options and value != "null":
                raise ConfigError(
                    f"{group}={value} is unknown; choose one of: {', '.join(options)}"
                )


def fig3_is_a_benchmark(panel: str) -> str:
    """What to run instead of ``experiment=fig3<x>``: Fig. 3 is a speed benchmark, its grids
    defined once in experiments/points.py (``GRIDS``)."""
    return (
        f"experiment={panel} is not a training run: Fig. 3 is a speed benchmark. Run "
        f"`python -m experiments.bench_speed --panels {panel[-1]} --grid full` (add --device "
        "cuda on a GPU; grids in experiments/points.py), then `python -m "
        "experiments.plot_fig3 outputs/bench_speed.csv`"
    )


def _key_of(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def _compose(overrides: list[str], known: tuple) -> DictConfig:
    """Hydra's composition of ``overrides`` (with the ``hydra`` node); errors as ConfigError.

    An override of a key the config lacks (``recurent=false``) is composed again as ``++`` so
    that the key check can name the key it was meant to be; a key that exists but is not in
    the config (``trainer.max_time``) needs ``+`` on the command line, as Hydra requires.
    """
    from hydra import compose
    from hydra.errors import ConfigCompositionException

    overrides, absent = list(overrides), []
    for _ in range(len(overrides) + 1):
        try:
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            break
        except ConfigCompositionException as err:
            key = getattr(err.__cause__, "full_key", None)
            i = next(
                (
                    i
                    for i, o in enumerate(overrides)
                    if key is not None and f"{o.split('=', 1)[0]}.".startswith(f"{key}.")
                ),
                None,
            )
            if key is None or i is None:
                raise ConfigError(first_line(err)) from None
            absent.append(overrides[i])
            overrides[i] = f"++{overrides[i]}"
        except Exception as err:  # a missing option file, a grammar error
            raise ConfigError(first_line(err)) from None
    if absent:
        # a misspelt key: did you mean ...; a real one: add it with +
        check_keys(OmegaConf.to_container(_task(cfg), resolve=False), *known)
        raise ConfigError(f"{_key_of(absent[0])} is not in this config; add it with +{absent[0]}")
    return cfg


def _task(cfg: DictConfig) -> DictConfig:
    """The job's config without its ``hydra`` node, as Hydra hands it to ``main``."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _check_job(cfg: DictConfig) -> None:
    """Validate a composed job config, its ``${hydra:...}`` values filled in as for a run."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(Path.cwd() / "<run dir>")
    HydraConfig.instance().set_config(cfg)
    validate(_task(cfg))


def preflight(argv: list[str]) -> list[str]:
    """Compose and check every job's config as Hydra will, before it creates or prints anything.

    A plain ``-m`` sweep (Hydra's basic sweeper) is expanded as the sweeper does, and each job
    is checked: a bad value stops the whole sweep before its first job. Returns Hydra overrides
    to append: each job folder named by the values it sweeps (``d=1,layers=2``), when those
    names are safe and unique and no config sets ``hydra.sweep.subdir`` itself. Each job is
    checked by ``dblock.launch.config.validate``, as ``run.py`` checks it.
    """
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv):
        return []  # --help, --cfg, -cn ...: Hydra's own modes
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    args = [a for a in argv if a not in MULTIRUN_FLAGS]
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(args)
    except Exception as err:
        raise ConfigError(f"cannot read the overrides: {first_line(err)}") from None
    hydra_args = [o.input_line for o in overrides if o.is_hydra_override()]
    task = [o for o in overrides if not o.is_hydra_override()]
    known = known_keys()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        if not multirun:
            _check_job(_compose(args, known))
            return []
        first = [  # the master config: each sweep at its first value
            f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            if o.is_sweep_override() and o.is_discrete_sweep()
            else o.input_line
            for o in task
            if not o.is_sweep_override() or o.is_discrete_sweep()
        ]
        master = _compose(hydra_args + first, known)
        if not master.hydra.sweeper._target_.endswith(".BasicSweeper"):
            # the sweeper chooses the values: each job is checked as it starts
            _check_job(master)
            return []
        params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
        every = parser.parse_overrides(params + [o.input_line for o in task])
        if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in every):
            _check_job(master)  # an interval: the basic sweeper refuses it itself
            return []
        swept: dict[str, tuple[str, int]] = {}
        for o in every:  # as BasicSweeper.split_arguments: a later override of a key wins
            n = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
            swept[o.get_key_element()] = (o.key_or_group, n)
        own = ("hydra.sweep.subdir", "hydra.job.config.override_dirname.exclude_keys")
        subdir = OmegaConf.to_container(master.hydra.sweep)["subdir"]
        named = subdir == "${hydra.job.num}" and not any(_key_of(a) in own for a in hydra_args)
        shared = sorted({key for key, n in swept.values() if n == 1})
        extra = [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(map(repr, shared))}]"]
        names = []
        for job in BasicSweeper.split_arguments(every, None)[0]:
            cfg = _compose(hydra_args + (extra if named else []) + job, known)
            names.append(cfg.hydra.job.override_dirname)
            _check_job(cfg)
    if named and len(set(names)) == len(names) and all(map(SAFE_NAME.fullmatch, names)):
        return [*extra, "hydra.sweep.subdir=${hydra.job.override_dirname}"]
    return []
