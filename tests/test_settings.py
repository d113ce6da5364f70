"""Setting values that would run as something else are refused up front, naming the key:
switches that are not booleans, seeds and learning rates that are not numbers, a top-level key
that lives in a group (issue 16, "values that run as something else")."""

from __future__ import annotations

import re

import pytest

from dblock.errors import ConfigError
from dblock.values import boolean, positive_int
from tests.faults import TINY, run_cli
from tests.test_run import preflight

SWITCH = "is a switch, give {k}=true or {k}=false"


@pytest.mark.parametrize(
    "argv, key",
    [
        (["recurrent=maybe"], "recurrent"),
        (["detach_recurrent=off"], "detach_recurrent"),
        (["model.recurrent=yes"], "model.recurrent"),
        (["train=1"], "train"),
        (["verbose=on"], "verbose"),
        (["dataset=shd", "dataset.cache=no"], "dataset.cache"),
        (["dataset=shd", "dataset.download=off"], "dataset.download"),
        (["trainer.deterministic=maybe"], "trainer.deterministic"),
        (["trainer.enable_model_summary=yes"], "trainer.enable_model_summary"),
        (["callbacks.best.save_on_train_epoch_end=1"], "callbacks.best.save_on_train_epoch_end"),
        (["logger=wandb", "logger.wandb.offline=sometimes"], "logger.wandb.offline"),
    ],
)
def test_a_switch_must_be_a_boolean(argv, key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"{key}=") + ".*" + SWITCH.format(k=key)):
        preflight(argv)


@pytest.mark.parametrize(
    "argv",
    [["recurrent=false", "detach_recurrent=False"], ["trainer.deterministic=warn"]],
)
def test_real_booleans_and_documented_values_pass(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preflight(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["seed=abc"], "seed='abc' is not allowed: seed must be an integer >= 0"),
        (["seed=-1"], "seed=-1 is not allowed: seed must be an integer >= 0"),
        (["seed=true"], "seed=True is not allowed"),
        (["task.lr=-1"], "task.lr=-1 is not allowed: task.lr must be a finite number > 0"),
        (["task.lr=abc"], "task.lr='abc' is not allowed"),
        (["task.lr=nan"], "task.lr=nan is not allowed"),
        (["task.gamma=0"], "task.gamma=0 is not allowed: task.gamma must be a finite number > 0"),
        (["task.milestones=[0,5]"], "task.milestones=[0, 5] is not allowed"),
        (["lr=0.1"], "lr is not a setting; did you mean `task.lr`?"),
        (["+gamma=0.5"], "gamma is not a setting; did you mean `task.gamma`?"),
    ],
)
def test_numbers_are_checked_up_front_naming_the_key(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        preflight(argv)
    assert list(tmp_path.iterdir()) == []


def test_one_helper_for_whole_numbers_and_one_for_switches():
    assert positive_int("n", 3) == 3 and boolean("b", False) is False
    for bad in (True, 2.0, "3", 0):
        with pytest.raises(ValueError, match="n=.* is not allowed: n must be an integer >= 1"):
            positive_int("n", bad)
    for bad in ("maybe", "off", 1, None):
        with pytest.raises(ValueError, match="b=.* is not allowed: b is a switch"):
            boolean("b", bad)


def test_run_py_refuses_a_non_boolean_switch_in_one_line(tmp_path):
    """In a real run, also inside a job that skipped the early check (the job's own check)."""
    out = tmp_path / "run"
    proc = run_cli([*TINY, "recurrent=maybe", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: recurrent='maybe' is not allowed: recurrent is a switch, give recurrent=true or "
        "recurrent=false"
    ]
    assert not out.exists()


def test_wandb_prints_no_anonymous_setting_warning(tmp_path):
    """Lightning passes ``anonymous=None`` to ``wandb.init``, which warns "The anonymous setting
    has no effect" for any value given: the run passes none (wandb not silenced here)."""
    out = tmp_path / "run"
    proc = run_cli(
        [*TINY, "logger=wandb", "trainer.max_epochs=1", f"hydra.run.dir={out}"],
        tmp_path,
        env={"WANDB_SILENT": "false"},
    )
    assert "The anonymous setting" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert list((out / "wandb").glob("offline-run-*"))
