"""run.py end to end on the embedded dataset: single runs, a sweep, the loggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.n_train=256", "dataset.n_test=128", "dataset.batch_size=64", "n_hidden=16"]


def run(args, tmp_path, check=True, env=None, timeout=900):
    """``python run.py ARGS`` in ``tmp_path``: data under ``tmp_path/data``, wandb offline, the
    project importable by worker processes (submitit); ``env`` adds or replaces variables."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    base = dict(
        os.environ,
        DBLOCK_DATA=str(tmp_path / "data"),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONPATH=path,
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
    res = json.loads((out / "results.json").read_text())
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
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "test acc" in proc.stdout


def test_resume_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(["trainer.max_epochs=1", f"hydra.run.dir={out}", *TINY], tmp_path)
    ckpt = out / "checkpoints" / "last.ckpt"
    run(["trainer.max_epochs=2", f"hydra.run.dir={out}", f"ckpt_path={ckpt}", *TINY], tmp_path)
    assert json.loads((out / "results.json").read_text())["epoch"] == 2


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run(
        ["-m", "d=1,5", "layers=1,2", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *TINY],
        tmp_path,
    )
    found = sorted(sweep.glob("*/results.json"))
    assert len(found) == 4
    got = {(r["d"], r["layers"]) for r in (json.loads(p.read_text()) for p in found)}
    assert got == {(1, 1), (1, 2), (5, 1), (5, 2)}


def test_wandb_offline(tmp_path):
    out = tmp_path / "run"
    run(["logger=wandb", "trainer.max_epochs=1", f"hydra.run.dir={out}", *TINY], tmp_path)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_bad_d_is_a_clear_error(tmp_path):
    proc = run(
        ["d=500", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}", *TINY],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "d=500" in proc.stderr and "T=100" in proc.stderr
    assert "Traceback" not in proc.stderr
