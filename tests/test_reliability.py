"""Reliability: resume after kill -9, safe checkpoints, DDP, validation, non-finite, determinism."""

from __future__ import annotations

import json
import math
import pickle
import re
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from datamodules.base import ShardSampler
from datamodules.bursts import BurstsDataModule
from dblock.config_check import ConfigError, check_config, check_data_dir
from tests.test_run import ROOT, run

TINY = ["dataset.n_train=256", "dataset.n_test=128", "dataset.batch_size=64", "n_hidden=16"]
# 3 epochs with an lr step after the first: resume must restore the scheduler too
RESUMABLE = [*TINY, "trainer.max_epochs=3", "task.milestones=[1]", "task.lr=0.01"]
TIMING = {"train/epoch_time_s", "wall_time_s", "tested_ckpt"}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: the baseline for resume, determinism and evaluation."""
    tmp = tmp_path_factory.mktemp("reference")
    run([*RESUMABLE, f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


def test_kill_9_then_resume_matches_uninterrupted(reference, tmp_path):
    out = tmp_path / "run"
    fault = ["+callbacks.fault._target_=tests.faults.KillAt", "+callbacks.fault.epoch=2"]
    proc = run([*RESUMABLE, f"hydra.run.dir={out}", *fault], tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL
    last = out / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 1 and not (out / "results.json").exists()
    run([*RESUMABLE, f"hydra.run.dir={out}", f"ckpt_path={last}"], tmp_path)
    got, want = results(out), results(reference)
    assert got["epoch"] == want["epoch"] == 3
    assert {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }
    a, b = load(last), load(reference / "checkpoints" / "last.ckpt")
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for key, value in b["optimizer_states"][0]["state"][0].items():
        assert torch.equal(a["optimizer_states"][0]["state"][0][key], value), key


def test_same_seed_same_result(reference, tmp_path):
    out = tmp_path / "run"
    run([*RESUMABLE, f"hydra.run.dir={out}"], tmp_path)
    got, want = results(out), results(reference)
    assert got["status"] == "ok" and got["test/acc"] is not None
    assert {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }


def test_best_checkpoint_tested_and_recorded(reference):
    res = results(reference)
    best = load(reference / "checkpoints" / "best.ckpt")
    assert res["tested_ckpt"] == str(reference / "checkpoints" / "best.ckpt")
    assert res["tested_epoch"] == best["epoch"] + 1
    callback = next(v for v in best["callbacks"].values() if v["monitor"] is not None)
    assert callback["monitor"] == "val/acc"
    assert res["selection"] == "val/acc (max)"


def test_evaluate_checkpoint_only(reference, tmp_path):
    out = tmp_path / "eval"
    ckpt = reference / "checkpoints" / "best.ckpt"
    run([*TINY, "train=false", f"ckpt_path={ckpt}", f"hydra.run.dir={out}"], tmp_path)
    got, want = results(out), results(reference)
    assert got["test/acc"] == want["test/acc"]
    assert got["test/loss"] == pytest.approx(want["test/loss"], rel=1e-6)
    assert got["tested_epoch"] == want["tested_epoch"] and got["epoch"] == want["tested_epoch"]


def test_paper_selection_and_test_last(tmp_path):
    out = tmp_path / "run"
    args = ["selection.monitor=train/loss", "selection.mode=min", "test_ckpt=last"]
    run(
        [*TINY, "trainer.max_epochs=2", "dataset.val_fraction=0", *args, f"hydra.run.dir={out}"],
        tmp_path,
    )
    res = results(out)
    assert res["tested_ckpt"].endswith("last.ckpt") and res["tested_epoch"] == 2
    best = load(out / "checkpoints" / "best.ckpt")
    callback = next(v for v in best["callbacks"].values() if v["monitor"] is not None)
    assert callback["monitor"] == "train/loss" and callback["best_model_score"] is not None


def test_bad_checkpoints_are_clear_errors(reference, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    cases = {
        tmp_path / "missing.ckpt": "does not exist",
        corrupt: "cannot be loaded",
        evil: "cannot be loaded",
    }
    for path, message in cases.items():
        proc = run(
            [*TINY, "train=false", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'r'}"],
            tmp_path,
            check=False,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert not marker.exists()
    wrong = run(
        [
            "dataset.n_train=256",
            "dataset.n_test=128",
            "n_hidden=32",
            "train=false",
            f"ckpt_path={reference / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={tmp_path / 'w'}",
        ],
        tmp_path,
        check=False,
    )
    assert wrong.returncode == 2 and "does not fit this config" in wrong.stderr


@pytest.mark.parametrize(
    "which, message",
    [("all", "non-finite training loss in epoch 1"), ("first", "non-finite weights in")],
)
def test_non_finite_stops_and_keeps_last_good(tmp_path, which, message):
    out = tmp_path / "run"
    fault = [
        "+callbacks.fault._target_=tests.faults.PoisonAt",
        "+callbacks.fault.epoch=1",
        f"+callbacks.fault.which={which}",
    ]
    proc = run(
        [*TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}", *fault], tmp_path, check=False
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    res = results(out)
    assert res["status"] == "failed" and "non-finite" in res["error"] and res["epoch"] == 1
    last = load(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())


def test_ddp_two_cpu_processes_match_single_process_eval(tmp_path):
    # 101 test samples: a padding sampler would count one sample twice
    data = ["dataset.n_train=256", "dataset.n_test=101", "dataset.batch_size=32", "n_hidden=16"]
    out = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1"]
    proc = run([*data, *ddp, f"hydra.run.dir={out}"], tmp_path)
    assert proc.stdout.count("test acc") == 1  # one summary, one results.json writer
    res = results(out)
    assert res["status"] == "ok" and res["epoch"] == 1
    assert res["test/samples"] == 101  # every test sample exactly once over both processes
    dm = BurstsDataModule(tmp_path / "data", n_train=256, n_test=101, batch_size=32)
    dm.prepare_data()
    dm.setup()
    n_train = len(dm.split_indices["train"][1])
    steps = load(out / "checkpoints" / "last.ckpt")["global_step"]
    assert steps == math.ceil(math.ceil(n_train / 2) / 32)  # each process trains on half
    single = tmp_path / "single"
    run(
        [*data, "train=false", f"ckpt_path={res['tested_ckpt']}", f"hydra.run.dir={single}"],
        tmp_path,
    )
    assert results(single)["test/acc"] == res["test/acc"]
    assert results(single)["test/samples"] == 101
    assert results(single)["test/loss"] == pytest.approx(res["test/loss"], rel=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        (["d=101"], "d=101 is not allowed: d must be an integer in 1..T, and T=100"),
        (["layers=0"], "layers=0 is not allowed: layers must be an integer >= 1"),
        (["n_hidden=0"], "n_hidden=0 is not allowed"),
        (["dataset.batch_size=0"], "dataset.batch_size=0 is not allowed"),
        (["model=foo"], "model=foo is unknown; choose one of: dblock, standard"),
        (["dataset=foo"], "dataset=foo is unknown; choose one of: bursts"),
        (["logger=foo"], "logger=foo is unknown; choose one of: csv, none, wandb"),
        (["dataset.val_fraction=0"], "selection.monitor=val/acc needs a validation split"),
        (["paths.data_dir=FILE/data"], "cannot be created or written"),
    ],
)
def test_bad_settings_rejected_at_start(tmp_path, override, message):
    (tmp_path / "file").write_text("")
    override = [o.replace("FILE", str(tmp_path / "file")) for o in override]
    out = tmp_path / "run"
    proc = run([*TINY, *override, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("d=0", "d=0 is not allowed"),
        ("d=2.5", "d=2.5 is not allowed"),
        ("model.model=lif", "model.model='lif' is unknown; choose one of: dblock, standard"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed"),
        ("selection.monitor=val/f1", "selection.monitor='val/f1' is unknown; choose one of: "),
        ("selection.mode=up", "selection.mode='up' is unknown; choose min or max"),
        ("test_ckpt=first", "test_ckpt='first' is unknown; choose best or last"),
        ("train=false", "train=false needs ckpt_path=PATH"),
    ],
)
def test_check_config_names_option_and_allowed_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(composed(tmp_path, override))


def test_default_config_is_valid(tmp_path):
    check_config(composed(tmp_path))
    check_config(composed(tmp_path, "model=standard", "d=500"))  # standard ignores d


def composed(tmp_path, *overrides: str) -> dict:
    """The config as run.py resolves it, minus the parts that need a running Hydra job."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.data_dir={tmp_path}", *overrides])
    OmegaConf.set_struct(cfg, False)
    for key in ("logger", "callbacks"):
        del cfg[key]
    del cfg.paths["output_dir"]
    del cfg.trainer["default_root_dir"]
    return OmegaConf.to_container(cfg, resolve=True)


def test_data_dir_must_exist_for_file_datasets(tmp_path):
    with pytest.raises(ConfigError, match="paths.data_dir=.*does not exist"):
        check_data_dir(tmp_path / "missing", generated=False)
    check_data_dir(tmp_path, generated=False)
    check_data_dir(tmp_path / "new" / "dir", generated=True)


def test_shard_sampler_covers_every_sample():
    for n, world in [(101, 2), (10, 3), (7, 1)]:
        evals = [list(ShardSampler(n, False, rank=r, world_size=world)) for r in range(world)]
        assert sorted(sum(evals, [])) == list(range(n))
        trains = [
            ShardSampler(n, True, seed=3, rank=r, world_size=world, pad=True) for r in range(world)
        ]
        for s in trains:
            s.set_epoch(4)
        shards = [list(s) for s in trains]
        assert len({len(s) for s in shards}) == 1 and set(sum(shards, [])) == set(range(n))
        assert all(len(s) == len(list(s)) for s in trains)
    a, b = ShardSampler(50, True, seed=0), ShardSampler(50, True, seed=0)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)


def test_non_finite_job_does_not_stop_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fault = ["+callbacks.fault._target_=tests.faults.PoisonAt", "+callbacks.fault.epoch=0,5"]
    proc = run(["-m", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *fault], tmp_path)
    assert "error: non-finite training loss in epoch 0" in proc.stderr
    jobs = [sweep / f"+callbacks.fault.epoch={e}" for e in (0, 5)]  # named by what they sweep
    status = [json.loads((job / "results.json").read_text())["status"] for job in jobs]
    assert status == ["failed", "ok"]
    # each job's run.log ends with its error or its summary line
    assert "non-finite" in (jobs[0] / "run.log").read_text().splitlines()[-1]
    assert "test acc" in (jobs[1] / "run.log").read_text().splitlines()[-1]


def test_ddp_inside_a_local_sweep_is_refused(tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    args = ["-m", *TINY, *ddp, "d=1,5", f"hydra.sweep.dir={tmp_path / 's'}"]
    proc = run(args, tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "error: trainer=ddp inside a -m sweep needs its processes started by SLURM" in proc.stderr
    )
