"""run.py end to end on the embedded dataset: single runs, a sweep, the loggers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pytorch_lightning.callbacks import TQDMProgressBar

from dblock.errors import ConfigError
from dblock.launch import preflight as early
from dblock.launch.config_keys import accepted_keywords
from dblock.training.progress import EpochLines, progress_bar
from dblock.training.results import one_line
from tests.faults import TINY, fault, run_cli, run_env

ROOT = Path(__file__).resolve().parents[1]
# what Lightning, torch and Python print on every run that no setting can act on
NOISE = ("GPU available", "TPU available", "litlogger", "Tip:", "LeafSpec", "Warning", "warning:")


def run(args, tmp_path, check=True, env=None, timeout=900):
    """``python run.py ARGS`` in ``tmp_path`` with ``tests.faults.run_env(tmp_path, env)``."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        env=run_env(tmp_path, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def results(run_dir: Path) -> dict:
    """A run's results.json."""
    return json.loads((run_dir / "results.json").read_text())


def test_default_config_composes_and_instantiates(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["paths.data_dir=" + str(tmp_path)], return_hydra_config=True
        )
    assert cfg.model.d == cfg.d and cfg.model.n_in == cfg.dataset.n_in
    net = instantiate(cfg.model)
    assert net.readout.d == cfg.d


@pytest.mark.parametrize("model", ["dblock", "standard"])
def test_run_writes_results(tmp_path, model):
    out = tmp_path / "run"
    proc = run([f"model={model}", "trainer.max_epochs=2", f"hydra.run.dir={out}", *TINY], tmp_path)
    res = results(out)
    for key in (
        "test/acc",
        "test/loss",
        "n_classes",
        "epoch",
        "train/epoch_time_s",
        "test/spikes_per_sample",
        "model",
        "d",
        "layers",
        "recurrent",
        "dataset",
        "seed",
    ):
        assert key in res, key
    assert res["epoch"] == 2 and res["model"] == model and res["dataset"] == "bursts"
    assert 0.0 <= res["test/acc"] <= 1.0 and res["test/spikes_per_sample"] > 0
    assert res["reduce"] == "sum" and res["smoke"] is False
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # the console, redirected: the data summary, one line per epoch, the summary line; nothing
    # on stderr, no config dump (it is in the run folder), no progress-bar carriage returns
    lines = proc.stdout.splitlines()
    assert proc.stderr == "" and "\r" not in proc.stdout
    assert not [line for line in lines if any(n in line for n in NOISE)]
    assert [line.split(":")[0] for line in lines if line.startswith("bursts ")] == [
        "bursts train",
        "bursts val",
        "bursts test",
    ]
    assert [line[:11] for line in lines if line.startswith("epoch")] == [
        "epoch 1/2: ",
        "epoch 2/2: ",
    ]
    assert "train/loss" in lines[-2] and "val/acc" in lines[-2]
    summary = lines[-1]
    assert "test acc" in summary and "reduce=sum" in summary and "2 epochs" in summary
    assert ("detach_recurrent=true" in summary) == (model == "dblock")
    data = ("generating ", "bursts_train: cached", "bursts_test: cached", "bursts ")
    assert len([line for line in lines if not line.startswith(data)]) == 2 + 1  # epochs, summary
    assert (
        "_target_" not in proc.stdout
        and "_target_: dblock.models.SNNClassifier" in (out / "config.yaml").read_text()
    )
    log = (out / "run.log").read_text().splitlines()
    assert "epoch 2/2" in log[-2] and log[-1].endswith(summary)


def test_resume_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(["trainer.max_epochs=1", f"hydra.run.dir={out}", *TINY], tmp_path)
    ckpt = out / "checkpoints" / "last.ckpt"
    run(["trainer.max_epochs=2", f"hydra.run.dir={out}", f"ckpt_path={ckpt}", *TINY], tmp_path)
    assert results(out)["epoch"] == 2


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run(
        ["-m", "d=1,5", "layers=1,2", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *TINY],
        tmp_path,
    )
    found = sorted(sweep.glob("*/results.json"))
    # each job's folder is named by the values it sweeps
    assert [p.parent.name for p in found] == [
        "d=1,layers=1",
        "d=1,layers=2",
        "d=5,layers=1",
        "d=5,layers=2",
    ]
    got = {(r["d"], r["layers"]) for r in (json.loads(p.read_text()) for p in found)}
    assert got == {(1, 1), (1, 2), (5, 1), (5, 2)}


def test_wandb_offline(tmp_path):
    out = tmp_path / "run"
    run(["logger=wandb", "trainer.max_epochs=1", f"hydra.run.dir={out}", *TINY], tmp_path)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


# --- settings refused before anything runs --------------------------------------------------


def preflight(argv: list[str]) -> list[str]:
    """run.py's check before Hydra starts (as its __main__ calls it)."""
    return early.preflight(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recurent=false"], "recurent is not a setting; did you mean `recurrent`?"),
        (["+recurent=false"], "recurent is not a setting; did you mean `recurrent`?"),
        (
            ["model.reduse=max"],
            "model.reduse is not a setting of dblock.models.SNNClassifier; "
            "did you mean `model.reduce`?",
        ),
        (["+dataset.batchsize=8"], "did you mean `dataset.batch_size`?"),
        (["task.lrr=0.1"], "did you mean `task.lr`?"),
        (["trainer.max_epoch=3"], "did you mean `trainer.max_epochs`?"),
        (["+selection.monitr=x"], "did you mean `selection.monitor`?"),
        (["+callbacks.progress.refresh=1"], "did you mean `callbacks.progress.refresh_rate`?"),
        (["dataset=shd", "dataset.n_train=5"], "only dataset=bursts has it"),
        (
            ["+logger.wandb.project=x"],
            "logger.wandb has no _target_, so nothing reads it; choose logger=wandb",
        ),
        (["trainer.max_time=00:01:00:00"], "add it with +trainer.max_time=00:01:00:00"),
        (
            ["trainer.max_epochs=-1"],
            "trainer.max_epochs=-1 would train until the process is killed",
        ),
        (["-m", "d=1,500"], "d=500 is not allowed"),  # every job of a sweep, before the first
        (["d=1,5"], "To sweep over it, add --multirun"),
        (["d=[1"], "cannot read the overrides"),
        (["ckpt_path=missing.ckpt"], "ckpt_path=missing.ckpt does not exist"),
    ],
)
def test_bad_settings_refused_before_hydra_starts(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        preflight(argv)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["model=standard", "d=500"],  # the standard SNN ignores d
        ["dataset=shd"],
        ["logger=wandb", "+logger.wandb.entity=lab"],  # wandb.init options pass through
        ["trainer=ddp", "+trainer.strategy.find_unused_parameters=true"],
        ["trainer.max_epochs=-1", "+trainer.max_time=00:00:01:00"],
        ["recipe=paper", "+callbacks.recipe.save_last=true"],
        ["debug=default", "verbose=true"],
        ["-m", "hparams_search=optuna"],
        ["-m", "experiment=fig4c_shd"],
    ],
)
def test_valid_settings_pass(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preflight(argv)


class _Base:
    def __init__(self, data_dir: str, batch_size: int = 1) -> None:
        self.data_dir, self.batch_size = data_dir, batch_size


class _NewOption(_Base):
    def __init__(self, data_dir: str, new_option: float = 0.5, **kwargs) -> None:
        super().__init__(data_dir, **kwargs)
        self.new_option = new_option


class _Wrapper:  # **kwargs go to a library, not to a base class: anything is accepted
    def __init__(self, name: str, **kwargs) -> None:
        self.options = kwargs


def test_known_keys_come_from_the_code():
    """A new constructor argument is a known key without touching any list: the arguments of a
    class, and of its bases when it hands **kwargs to super().__init__, are accepted."""
    assert accepted_keywords(f"{__name__}._NewOption") == {"data_dir", "new_option", "batch_size"}
    assert accepted_keywords(f"{__name__}._Wrapper") is None
    assert "val_fraction" in accepted_keywords("datamodules.bursts.BurstsDataModule")
    assert "max_time" in accepted_keywords("pytorch_lightning.Trainer")


def test_sweep_jobs_named_by_their_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = preflight(["-m", "d=1,5", "layers=2", *fault("PoisonAt", epoch="0,5")])
    assert extra == [
        "hydra.job.config.override_dirname.exclude_keys=['callbacks.fault._target_','layers']",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
    ]
    # unsafe names (brackets, slashes) stay numbered, as do configs that name their own jobs
    assert preflight(["-m", "task.milestones=[1],[2]"]) == []
    assert preflight(["-m", "experiment=fig4b_shd"]) == []
    assert preflight(["-m", "hparams_search=optuna"]) == []


def test_summary_line_says_what_ran():
    summary = {
        "model": "dblock",
        "d": 10,
        "layers": 1,
        "recurrent": True,
        "detach_recurrent": False,
        "reduce": "max",
        "dataset": "shd",
        "test/acc": 0.5,
        "test/loss": 1.0,
        "test/spikes_per_sample": 3.0,
        "train/epoch_time_s": 0.5,
        "epoch": 3,
        "tested_ckpt": "run/checkpoints/best.ckpt",
        "tested_epoch": 2,
        "smoke": False,
    }
    line = one_line(summary, "run")
    assert line.startswith("dblock d=10 layers=1 recurrent detach_recurrent=false reduce=max on")
    assert "0.50 s/epoch, 3 epochs" in line
    line = one_line(summary, "run", trained=False)  # train=false: nothing was trained
    assert (
        "s/epoch" not in line and "evaluated run/checkpoints/best.ckpt (trained 2 epochs)" in line
    )
    line = one_line({**summary, "smoke": True}, "run")
    assert line.startswith("smoke run of") and "test acc" not in line and "not results" in line
    line = one_line({**summary, "recurrent": False}, "run")
    assert " feedforward reduce=max" in line and "detach" not in line


def test_progress_display_follows_the_terminal():
    assert isinstance(progress_bar(terminal=True), TQDMProgressBar)
    assert isinstance(progress_bar(terminal=False), EpochLines)


def test_refused_run_leaves_no_folder_and_a_kept_folder_logs_the_error(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["+recurent=false", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: recurent is not a setting; did you mean `recurrent`?\n"
    assert not out.exists()
    # refused inside the job (the split is known only once the data is read): removed too
    bad = ["dataset.val_fraction=0", "trainer.max_epochs=1", *TINY]
    proc = run_cli([*bad, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "needs a validation split" in proc.stderr
    assert not out.exists()
    # a folder that already held something is kept, and its run.log records the error
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    proc = run_cli([*bad, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and (out / "notes.txt").is_file()
    assert "needs a validation split" in (out / "run.log").read_text().splitlines()[-1]


def test_smoke_run_is_not_a_result_and_verbose_shows_the_config(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["debug=default", "verbose=true", f"hydra.run.dir={out}", *TINY], tmp_path)
    assert results(out)["smoke"] is True
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("smoke run of dblock d=10") and "test acc" not in last
    assert "_target_: dblock.models.SNNClassifier" in proc.stdout  # the resolved config
    assert "fast_dev_run" in proc.stdout + proc.stderr  # Lightning's info lines, back on


def test_terminal_gets_the_bar_and_run_log_the_epoch_lines(tmp_path):
    """Under a terminal (a pseudo-terminal here) the console shows Lightning's bar; the run's
    log still gets one line per epoch."""
    pty = pytest.importorskip("pty")  # POSIX
    import fcntl
    import struct
    import termios

    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: run.py on the terminal's side
        try:
            os.chdir(tmp_path)
            args = ["trainer.max_epochs=1", f"hydra.run.dir={out}", "logger=none", *TINY]
            argv = [sys.executable, str(ROOT / "run.py"), *args]
            os.execve(sys.executable, argv, run_env(tmp_path))
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    text = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        text += chunk
    assert os.waitpid(pid, 0)[1] == 0
    text = text.decode(errors="replace")
    assert "Epoch 0: 100%" in text and "epoch 1/1:" not in text  # the bar, not the line
    log = (out / "run.log").read_text()
    assert "epoch 1/1: train/loss" in log and "test acc" in log.splitlines()[-1]
