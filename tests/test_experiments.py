"""Experiment files, the paper recipe group, launchers, the Optuna search and the wandb logger."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dblock.launch.wandb_setup import wandb_offline  # also registers the dblock.* resolvers
from tests.faults import TINY, run_cli
from tests.test_run import results
from tests.test_run import run as run_in_new_process

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
FIG4 = [e for e in EXPERIMENTS if e.startswith("fig4")]


def composed(tmp_path, overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            return_hydra_config=True,
            overrides=[
                f"paths.data_dir={tmp_path}",
                f"hydra.runtime.output_dir={tmp_path / 'out'}",
                *overrides,
            ],
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


def instantiate_all(cfg):
    """Model, task, callbacks and loggers built; the datamodule only constructed (no data read)."""
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model, _convert_="all")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    datamodule = instantiate(cfg.dataset, _convert_="all")
    return model, task, callbacks, datamodule


def test_every_panel_has_an_experiment():
    for panel in "abcde":
        for ds in ("nmnist", "shd", "ssc"):
            assert f"fig4{panel}_{ds}" in EXPERIMENTS
    # Fig. 3 is a speed benchmark: its grids live in experiments/points.py, not here
    assert not [e for e in EXPERIMENTS if e.startswith("fig3")]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates_on_bursts(tmp_path, name):
    cfg = composed(tmp_path, [f"experiment={name}", "dataset=bursts"])
    model, task, callbacks, datamodule = instantiate_all(cfg)
    assert model.readout.d == (cfg.d if cfg.model.model == "dblock" else None)
    assert task.hparams.n_classes == 10
    if name.startswith("fig4"):
        assert cfg.hydra.sweep.dir == "outputs/fig4/bursts"
        recipe = [c for c in callbacks if type(c).__name__ == "PaperRecipe"]
        assert len(recipe) == 1 and recipe[0].monitor == "train/loss" and recipe[0].mode == "min"
        assert recipe[0].milestones == list(cfg.task.milestones)
        assert cfg.trainer.max_epochs == 100 and cfg.task.lr == 1e-3
        assert cfg.hydra.sweeper.params.seed == "0,1,2"
        assert cfg.task.milestones == ([30, 60] if name.endswith("ssc") else [30, 60, 90])


def dataset_of(name: str) -> str | None:
    return name.rsplit("_", 1)[1] if name.startswith("fig4") else None


@pytest.mark.parametrize("name", [e for e in FIG4])
def test_experiment_composes_with_its_real_dataset(tmp_path, name):
    ds = dataset_of(name)
    if not (ROOT / "conf" / "dataset" / f"{ds}.yaml").is_file():
        # conf/dataset/{shd,ssc,nmnist}.yaml come with the real-dataset datamodules
        with pytest.raises(MissingConfigException, match=ds):
            composed(tmp_path, [f"experiment={name}"])
        return
    cfg = composed(tmp_path, [f"experiment={name}"])
    assert cfg.hydra.runtime.choices.dataset == ds
    model, task, _, datamodule = instantiate_all(cfg)
    assert model.readout.d == (cfg.d if cfg.model.model == "dblock" else None)
    assert cfg.model.n_in == cfg.dataset.n_in


SWEEPS = {  # panel -> the grid its sweep must cover (docs/model.md §7)
    "fig4a": {"d": "1,10,20,30,40", "recurrent": "false,true", "seed": "0,1,2"},
    "fig4b": {"detach_recurrent": "true,false", "seed": "0,1,2"},
    "fig4c": {"layers": "1,2,3", "seed": "0,1,2"},
    "fig4d": {"seed": "0,1,2"},
    "fig4e": {"seed": "0,1,2"},
}


@pytest.mark.parametrize("name", FIG4)
def test_fig4_sweep_grids(tmp_path, name):
    cfg = composed(tmp_path, [f"experiment={name}", "dataset=bursts"])
    assert dict(cfg.hydra.sweeper.params) == SWEEPS[name.split("_")[0]]
    panel = name[4]
    assert cfg.model.model == ("standard" if panel in "de" else "dblock")
    if panel in "bc":
        assert cfg.d == 40 and cfg.recurrent


def readme_sweeps(marker: str) -> list[list[str]]:
    """The ``python run.py -m ...`` commands of the README's code block after ``marker``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(marker):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[3:] for line in block.splitlines()
            if line.startswith("python run.py -m ")]


def test_readme_small_fig4_try_is_small(tmp_path):
    """The README's quick Fig. 4 try: 5 jobs of 3 epochs (4 of 4a, 1 standard), as it says."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs = []
    for args in readme_sweeps("To try the whole path on the embedded dataset"):
        fixed = [a for a in args if "," not in a]
        cfg = composed(tmp_path, fixed)
        assert cfg.trainer.max_epochs == 3 and list(cfg.task.milestones) == [2]
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + args
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params),
                                               None)
        jobs += [dict(o.lower().split("=", 1) for o in job) for job in batches[0]]
    assert len(jobs) == 5
    assert sorted((j["experiment"], j.get("d"), j.get("recurrent")) for j in jobs) == [
        ("fig4a_shd", "1", "false"), ("fig4a_shd", "1", "true"),
        ("fig4a_shd", "10", "false"), ("fig4a_shd", "10", "true"), ("fig4d_shd", None, None)]
    assert {j["seed"] for j in jobs} == {"0"}


@pytest.mark.parametrize("panel", ["a", "b", "c", "d"])
def test_fig3_grids(panel):
    from experiments.points import D_VALUES, GRIDS

    mode, shapes, n_in = GRIDS["full"][panel]
    assert list(D_VALUES) == [5, 10, 15, 20, 25, 30] and n_in == 1000
    assert mode == ("feedforward" if panel in "ab" else "recurrent")
    t_lens, sizes = sorted({t for t, _ in shapes}), sorted({n for _, n in shapes})
    if panel in "ac":
        assert t_lens == [32 * 2**i for i in range(7)] and sizes == [100]
    else:
        assert t_lens == [512] and sizes == list(range(100, 1001, 100))
    from dblock.models import SNNClassifier

    net = SNNClassifier(
        n_in=n_in,
        n_hidden=max(sizes),
        n_layers=1,
        n_classes=2,
        model="dblock",
        d=max(D_VALUES),
        t_len=min(t_lens),
        recurrent=mode == "recurrent",
    )
    assert net.readout.d == 30


def test_fig3_grids_defined_once():
    """One definition of each Fig. 3 grid: experiments.points.GRIDS; no config file repeats one."""
    for path in (ROOT / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "bench:" not in text and "2048" not in text, path


@pytest.mark.parametrize("args", [["experiment=fig3a"], ["-m", "experiment=fig4a_shd,fig3c"]])
def test_fig3_experiment_points_to_the_benchmark(tmp_path, args):
    proc = run_cli([*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    panel = [a for a in args if "fig3" in a][0].split("fig3")[1]
    assert proc.stderr.strip().splitlines() == [
        f"error: experiment=fig3{panel} is not a training run: Fig. 3 is a speed benchmark. Run "
        f"`python -m experiments.bench_speed --panels {panel} --grid full` (add --device cuda on "
        "a GPU; grids in experiments/points.py), then `python -m experiments.plot_fig3 "
        "outputs/bench_speed.csv`"
    ]
    assert not (tmp_path / "run").exists()


def test_launcher_and_search_configs(tmp_path):
    cfg = composed(tmp_path, ["hydra/launcher=slurm"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    instantiate(cfg.hydra.launcher)
    cfg = composed(tmp_path, ["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"task.lr", "d", "n_hidden"}


def test_wandb_offline_unless_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_offline()  # no key anywhere: offline
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    assert not wandb_offline()  # logged in: online
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()  # forced offline
    cfg = composed(tmp_path, ["logger=wandb", "experiment=fig4a_shd", "dataset=bursts", "seed=2"])
    logger = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert logger["offline"] is True and logger["group"] == "fig4a_shd"
    assert {"model=dblock", "d=10", "layers=1", "dataset=bursts", "seed=2"} <= set(logger["tags"])


def test_two_job_sweep_one_wandb_run_per_job_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("# the sweep before, e.g. fig4a's\n")
    run_cli(
        [
            "-m",
            "experiment=fig4b_shd",
            "dataset=bursts",
            "seed=0",
            "logger=wandb",
            "trainer.max_epochs=2",
            "task.milestones=[1]",
            f"hydra.sweep.dir={sweep}",
            *TINY,
        ],
        tmp_path,
    )
    (kept,) = sweep.glob("multirun-*.yaml")  # one multirun*.yaml per sweep
    assert kept.read_text() == "# the sweep before, e.g. fig4a's\n"
    assert "fig4b_shd" in (sweep / "multirun.yaml").read_text()
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert [j.name for j in jobs] == [
        "dblock-d40-layers1-recTrue-detFalse-seed0",
        "dblock-d40-layers1-recTrue-detTrue-seed0",
    ]
    ids = set()
    for job in jobs:
        res = results(job)
        assert res["epoch"] == 2 and res["d"] == 40 and res["dataset"] == "bursts"
        assert (job / "checkpoints" / "best-train-loss.ckpt").is_file()  # the recipe's checkpoint
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1  # one wandb run per job
        ids.add(runs[0].name)
        data = next(runs[0].glob("*.wandb")).read_bytes()
        for text in (
            b"fig4b_shd",
            b"model=dblock",
            b"d=40",
            b"seed=0",
            b"spikes_per_sample",
            b"epoch_time_s",
            f"detach_recurrent={res['detach_recurrent']}".encode()[:16],
        ):
            assert text in data, text
    assert len(ids) == 2
    out = tmp_path / "figs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m", "experiments.plot_fig4",
            "b",
            str(sweep),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "fig4b_bursts.png").stat().st_size > 1000
    assert "(n=1)" in (out / "fig4b_bursts.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_parallel_launchers_run_two_jobs(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    args = ["-m", f"hydra/launcher={launcher}", "d=1,5", f"hydra.sweep.dir={sweep}", *extra]
    # joblib's workers wait minutes when run.py runs forked from run_cli's server
    launch = run_in_new_process if launcher == "joblib" else run_cli
    launch([*args, *TINY, "trainer.max_epochs=1"], tmp_path)
    got = sorted(json.loads(p.read_text())["d"] for p in sweep.glob("*/results.json"))
    assert got == [1, 5]


@pytest.mark.slow
def test_optuna_search_runs(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.params.n_hidden='choice(8,16)'",
            *TINY[:-1],
            "trainer.max_epochs=1",
        ],
        tmp_path,
    )
    assert len(list(sweep.glob("*/results.json"))) == 2
    assert (sweep / "optimization_results.yaml").is_file()
