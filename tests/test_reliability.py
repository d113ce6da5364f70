"""Reliability: kills at every checkpoint write, full disks, shared run dirs, leftovers,
checkpoint checks, DDP, validation, non-finite, determinism (signals: tests/test_interrupts.py).
Runs go through ``tests.faults.run_cli``."""

from __future__ import annotations

import json
import math
import os
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
from dblock.errors import ConfigError
from dblock.launch.config import check_config, check_data_dir
from tests.faults import RESUMABLE, TINY, dead_pid, fault, run_cli
from tests.test_run import ROOT, results, run

TIMING = {"train/epoch_time_s", "wall_time_s", "tested_ckpt"}


def same(got: dict, want: dict) -> bool:
    """Equal results.json contents, timings and the run dir's own paths aside."""
    return {k: v for k, v in got.items() if k not in TIMING} == {
        k: v for k, v in want.items() if k not in TIMING
    }


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# every place a kill can land in a 3-epoch run: mid-epoch, and each phase of each checkpoint
# write (best.ckpt improves in epoch 0 only, so epochs 1-2 write last.ckpt alone), then the test
KILLS = [
    (0, fault("KillAt", epoch=0, batch=1)),
    (0, fault("KillDuringWrite", epoch=0, name="best.ckpt", phase="write")),
    (0, fault("KillDuringWrite", epoch=0, name="best.ckpt", phase="done")),
    (0, fault("KillDuringWrite", epoch=0, name="last.ckpt", phase="write")),
    (0, fault("KillDuringWrite", epoch=0, name="last.ckpt", phase="replace")),
    (1, fault("KillDuringWrite", epoch=0, name="last.ckpt", phase="done")),
    (1, fault("KillAt", epoch=1, batch=0)),
    (1, fault("KillDuringWrite", epoch=1, name="last.ckpt", phase="open")),
    (2, fault("KillDuringWrite", epoch=1, name="last.ckpt", phase="done")),
    (2, fault("KillAt", epoch=2, batch=2)),
    (3, fault("KillAtTest")),
]


def test_kill_at_every_write_point_resumes_to_the_uninterrupted_results(reference, tmp_path):
    """One run killed (kill -9) at each point of KILLS in turn, each time resumed from
    last.ckpt, with every rename between directories failing as on a cluster (TMPDIR on another
    filesystem): no kill loses more than the epoch in progress, every file left is whole, and
    the last life writes exactly the uninterrupted run's results.json, weights and state."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    xdev = fault("CrossDevice", key="xdev")
    for saved, kill in [*KILLS, (None, [])]:
        resume = [f"ckpt_path={last}"] if last.exists() else []
        proc = run_cli(
            [*RESUMABLE, f"hydra.run.dir={out}", *resume, *xdev, *kill], tmp_path, check=False
        )
        if saved is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
            break
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr[-3000:])
        assert not (out / "results.json").exists()
        epochs = load(last)["epoch"] + 1 if last.exists() else 0
        assert epochs == saved, kill  # never more than the epoch in progress is lost
        for ckpt in (out / "checkpoints").glob("*.ckpt"):
            load(ckpt)  # whole: the previous version survives a kill during its rewrite
    assert same(results(out), results(reference))
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / ".lock").exists()
    a, b = load(last), load(reference / "checkpoints" / "last.ckpt")
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for key, value in b["optimizer_states"][0]["state"][0].items():
        assert torch.equal(a["optimizer_states"][0]["state"][0][key], value), key


def test_kill_during_a_cross_device_checkpoint_write_keeps_the_previous_one(tmp_path):
    """TMPDIR on another filesystem than the run dir (EXDEV on rename), killed while last.ckpt
    is written: the previous last.ckpt is still whole and the next start removes the temp file."""
    out = tmp_path / "run"
    kill = fault("KillDuringWrite", epoch=1, name="last.ckpt", phase="open")
    args = [*TINY, "trainer.max_epochs=2", f"hydra.run.dir={out}", *kill]
    proc = run_cli([*args, *fault("CrossDevice", key="xdev")], tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert load(out / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert len(list((out / "checkpoints").glob("last.ckpt.*.tmp"))) == 1
    proc = run_cli(
        [
            *TINY,
            "trainer.max_epochs=1",
            "train=false",
            f"hydra.run.dir={out}",
            f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        ],
        tmp_path,
    )
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}", *fault("FullDisk", epoch=1)]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(
        rf"error: no space left on the device writing {re.escape(str(out))}/checkpoints/"
        r"(best|last)\.ckpt \([\d.]+ [KMGT]?i?B free there\)",
        line,
    ), line
    last = out / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 0 and not list((out / "checkpoints").glob("*.tmp"))
    res = results(out)
    assert res["status"] == "failed" and res["last_good_ckpt"] == str(last)


def test_resume_at_an_epoch_boundary_selects_as_the_uninterrupted_run(reference, tmp_path):
    """Killed at the start of epoch 1: last.ckpt (epoch 0) must hold epoch 0's selection state,
    or the resumed run picks another best epoch than the uninterrupted one and tests it."""
    out, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    kill = fault("KillAt", epoch=1, batch=0)
    proc = run_cli([*RESUMABLE, f"hydra.run.dir={out}", *kill], tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL and load(last)["epoch"] == 0
    run_cli([*RESUMABLE, f"hydra.run.dir={out}", f"ckpt_path={last}"], tmp_path)
    got, want = results(out), results(reference)
    assert (got["tested_epoch"], got["test/acc"]) == (want["tested_epoch"], want["test/acc"])
    assert same(got, want)


def test_recipe_paper_resumes_exactly(tmp_path):
    """The paper recipe's checkpoint (best-train-loss.ckpt) and milestone state are in last.ckpt:
    killed after its checkpoint but before last.ckpt, then at the milestone epoch, and resumed
    each time, it reloads, restarts Adam and selects as an uninterrupted run does."""
    args = [*RESUMABLE, "recipe=paper"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    run_cli([*args, f"hydra.run.dir={ref}"], tmp_path)
    kills = [
        fault("KillDuringWrite", epoch=0, name="best-train-loss.ckpt", phase="done"),
        fault("KillAt", epoch=1, batch=0),
    ]
    for kill in kills:
        resume = [f"ckpt_path={last}"] if last.exists() else []
        proc = run_cli([*args, f"hydra.run.dir={out}", *resume, *kill], tmp_path, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_cli([*args, f"hydra.run.dir={out}", f"ckpt_path={last}"], tmp_path)
    got, want = results(out), results(ref)
    assert same(got, want) and got["tested_ckpt"] == str(out / "checkpoints/best-train-loss.ckpt")


def test_checkpoint_of_another_model_is_refused(reference, tmp_path):
    last = reference / "checkpoints" / "last.ckpt"
    cases = [
        (
            ["train=false", "d=5"],
            "was written with model.d=10, this run has model.d=5; evaluate it with d=10",
        ),
        (
            ["model.reduce=max"],
            "was written with model.reduce=sum, this run has "
            "model.reduce=max; resume it with model.reduce=sum",
        ),
        (
            ["train=false", "recurrent=false"],
            "was written with model.recurrent=true, this run has "
            "model.recurrent=false; evaluate it with recurrent=true",
        ),
    ]
    for override, message in cases:
        args = [*RESUMABLE, *override, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'r'}"]
        proc = run_cli(args, tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        want = f"error: ckpt_path={last} {message} (the checkpoint's model and data must match"
        assert proc.stderr.strip().splitlines()[-1] == want + " the run)"
        assert proc.stderr.count("error:") == 1
        assert not (tmp_path / "r" / "results.json").exists()


def test_second_run_in_the_same_run_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    proc = run_cli([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: run dir {out} in use by pid {os.getpid()} (lock file {out / '.lock'})")
    )
    assert not (out / "checkpoints").exists()


def test_leftovers_do_not_break_the_next_run(tmp_path):
    """Temp files of killed writers (a generated dataset, a cache entry) are removed at the next
    start, and a run that fails before any checkpoint names none as the last good one."""
    dead = dead_pid()
    data = tmp_path / "data"
    orphans = [
        data / "BURSTS" / f"bursts_train.h5.{dead}.tmp",
        data / "cache" / "bursts" / f"bursts_train-0123.npz.{dead}.tmp",
    ]
    for p in orphans:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 1000)
    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=1", "task.lr=1e30", f"hydra.run.dir={out}"]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 3 and "non-finite" in proc.stderr
    assert not any(p.exists() for p in orphans)
    res = results(out)
    assert res["status"] == "failed" and res["last_good_ckpt"] is None
    assert not (out / "checkpoints" / "last.ckpt").exists()


def test_same_seed_same_result(reference, tmp_path):
    out = tmp_path / "run"
    run_cli([*RESUMABLE, f"hydra.run.dir={out}"], tmp_path)
    got, want = results(out), results(reference)
    assert got["status"] == "ok" and got["test/acc"] is not None
    assert same(got, want)


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
    run_cli([*TINY, "train=false", f"ckpt_path={ckpt}", f"hydra.run.dir={out}"], tmp_path)
    got, want = results(out), results(reference)
    assert got["test/acc"] == want["test/acc"]
    assert got["test/loss"] == pytest.approx(want["test/loss"], rel=1e-6)
    assert got["tested_epoch"] == want["tested_epoch"] and got["epoch"] == want["tested_epoch"]


def test_paper_selection_and_test_last(tmp_path):
    out = tmp_path / "run"
    args = ["selection.monitor=train/loss", "selection.mode=min", "test_ckpt=last"]
    run_cli(
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
        proc = run_cli(
            [*TINY, "train=false", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'r'}"],
            tmp_path,
            check=False,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error:")
        assert "weights_only" not in proc.stderr  # no advice to load it unsafely
    assert not marker.exists()
    wrong = run_cli(
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
    assert wrong.returncode == 2 and "model.n_hidden=16, this run has model.n_hidden=32" in (
        wrong.stderr
    )


@pytest.mark.parametrize(
    "which, message",
    [("all", "non-finite training loss in epoch 1"), ("first", "non-finite weights in")],
)
def test_non_finite_stops_and_keeps_last_good(tmp_path, which, message):
    out = tmp_path / "run"
    poison = fault("PoisonAt", epoch=1, which=which)
    proc = run_cli(
        [*TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}", *poison], tmp_path, check=False
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
    run_cli(
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
        (
            ["d=500", "trainer.max_epochs=1"],
            "d=500 is not allowed: d must be an integer in 1..T, and T=100",
        ),
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
    proc = run_cli([*TINY, *override, f"hydra.run.dir={out}"], tmp_path, check=False)
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
        ("dataset.input=csr", "dataset.input='csr' is unknown; choose one of: auto, dense, sparse"),
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
    poison = fault("PoisonAt", epoch="0,5")
    proc = run_cli(
        ["-m", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *poison], tmp_path
    )
    assert "error: non-finite training loss in epoch 0" in proc.stderr
    jobs = [sweep / f"+callbacks.fault.epoch={e}" for e in (0, 5)]  # named by what they sweep
    status = [results(job)["status"] for job in jobs]
    assert status == ["failed", "ok"]
    # each job's run.log ends with its error or its summary line
    assert "non-finite" in (jobs[0] / "run.log").read_text().splitlines()[-1]
    assert "test acc" in (jobs[1] / "run.log").read_text().splitlines()[-1]


def test_ddp_inside_a_local_sweep_is_refused(tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    args = ["-m", *TINY, *ddp, "d=1,5", f"hydra.sweep.dir={tmp_path / 's'}"]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "error: trainer=ddp inside a -m sweep needs its processes started by SLURM" in proc.stderr
    )
