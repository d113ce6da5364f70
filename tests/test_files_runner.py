"""Checkpoint loading and checks, signals, results.json and the safe writers, in process: atomic
files, full disks, leftovers, the run-dir lock, signals, checkpoint checks, the cache checksum."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shlex
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import cache
from datamodules.cache import cached_store
from datamodules.checks import DataError
from datamodules.hdf5 import write_h5
from datamodules.store import EventStore
from dblock.errors import ConfigError
from dblock.files import HOST, DiskFullError, atomic_write, identity, remove_orphans
from dblock.launch.lock import RunLock
from dblock.training.checkpoint_io import AtomicCheckpointIO, order_checkpoints
from dblock.training.checkpoints import check_checkpoint, first_mismatch, load_checkpoint
from dblock.training.results import resume_command, summary
from dblock.training.signals import Interrupted, SignalStop
from tests.faults import dead_pid


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_stages_beside_the_target_not_in_tmpdir(tmp_path, monkeypatch):
    staging = tmp_path / "tmpdir"  # TMPDIR: another filesystem on a cluster
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    target = tmp_path / "run" / "last.ckpt"
    seen = []

    def write(f):
        seen.append(Path(f.name))
        f.write(b"new")

    atomic_write(target, write)
    assert target.read_bytes() == b"new" and not list(staging.iterdir())
    assert seen[0].parent == target.parent and seen[0].name.endswith(".tmp")
    assert not seen[0].exists()


def test_checkpoint_io_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "")))
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_disk_is_one_message_naming_the_path_and_free_space(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def write(f):
        f.write(b"partial")
        no_space()

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, write)
    message = str(info.value)
    assert message.startswith(f"no space left on the device writing {target} (")
    assert " free there)" in message and "\n" not in message
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_write_h5_failure_leaves_no_temp_file(tmp_path):
    path = tmp_path / "BURSTS" / "bursts_train.h5"
    path.parent.mkdir()
    times = [np.array([0.1, 0.2]), np.array([0.3])]
    with pytest.raises(ValueError):  # 3 unit lists for 2 time lists: fails mid-write
        write_h5(path, times, [np.array([1, 2]), np.array([3]), np.array([4])], np.array([0, 1]))
    assert not path.exists() and not list(path.parent.iterdir())


def test_orphan_temp_files_of_dead_writers_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    keep = [
        tmp_path / f"a.h5.{alive}@{HOST}.tmp",  # a live writer on this host
        tmp_path / f"b.npz.{dead}@another-node.tmp",  # a writer on another host: unknowable
        tmp_path / "notes.tmp",  # not a writer's temp file
    ]
    gone = [tmp_path / f"c.ckpt.{dead}@{HOST}.tmp", tmp_path / f"d.h5.{dead}.tmp"]
    for p in keep + gone:
        p.write_text("x")
    assert sorted(remove_orphans([tmp_path, tmp_path / "missing"])) == sorted(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    lock = tmp_path / ".lock"
    with RunLock(tmp_path):
        assert json.loads(lock.read_text()) == identity()
        assert identity()["pid"] == os.getpid() and identity()["host"] == HOST
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 12, "host": "another-node"}))
    with pytest.raises(ConfigError, match="in use by pid 12 on host another-node"):
        RunLock(tmp_path).acquire()
    dead = dead_pid()
    lock.write_text(json.dumps({"pid": dead, "host": HOST}))
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"locked by pid {dead}, which is gone; taking it over" in caplog.text
    assert not lock.exists() and not list(tmp_path.iterdir())


def test_signal_outside_lightning_stops_at_once_with_its_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop, pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.name == "SIGTERM" and stop.exit_code == 143 and not stop.requeue
    assert signal.getsignal(signal.SIGTERM) == before
    with SignalStop() as stop:
        stop.watch_requeue(signal.SIGUSR1)
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requeue and stop.exit_code == 128 + signal.SIGUSR1
    with SignalStop() as stop:
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl+C: stop now
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.exit_code == 130


CONFIG = {
    "dataset": {"name": "bursts", "t_len": 100, "val_fraction": 0.1, "data_dir": "/a"},
    "model": {"model": "dblock", "d": 10, "reduce": "sum", "n_hidden": 16},
    "seed": 0,
}


def variant(section: str | None, **changes) -> dict:
    out = json.loads(json.dumps(CONFIG))
    (out[section] if section else out).update(changes)
    return out


def test_checkpoint_config_mismatches():
    mismatch = first_mismatch
    assert mismatch(CONFIG, variant("dataset", data_dir="/b", batch_size=7), False)[0] is None
    assert mismatch(CONFIG, variant("dataset", input="dense"), False)[0] is None  # same results
    assert mismatch(CONFIG, variant("model", d=5), True) == ("model.d", 10, 5)
    assert mismatch(CONFIG, variant("dataset", t_len=50), True) == ("dataset.t_len", 100, 50)
    assert mismatch(CONFIG, variant("dataset", val_fraction=0.0), True)[0] is None
    assert (
        mismatch(CONFIG, variant("dataset", val_fraction=0.0), False)[0] == "dataset.val_fraction"
    )
    assert mismatch(CONFIG, variant(None, seed=1), True)[0] is None
    assert mismatch(CONFIG, variant(None, seed=1), False) == ("seed", 0, 1)
    standard = variant("model", model="standard")
    assert mismatch(standard, variant("model", model="standard", d=3), False)[0] is None
    assert mismatch(CONFIG, standard, True) == ("model.model", "dblock", "standard")
    ckpt = {"state_dict": {"w": torch.zeros(2)}, "dblock_config": CONFIG}
    with pytest.raises(
        ConfigError,
        match=r"was written with model.d=10, this run has model.d=5; "
        r"resume it with d=10",
    ):
        check_checkpoint(ckpt, "x.ckpt", {"w": (2,)}, variant("model", d=5), False)
    with pytest.raises(ConfigError, match=r"w is \(2,\) in the checkpoint, \(3,\) here"):
        check_checkpoint(ckpt, "x.ckpt", {"w": (3,)}, CONFIG, False)
    check_checkpoint(ckpt, "x.ckpt", {"w": (2,)}, CONFIG, False)


def test_unsafe_checkpoint_error_gives_no_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": os.system}))
    with pytest.raises(ConfigError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert "Python objects other than tensors and plain types" in message
    assert "weights_only" not in message and "\n" not in message


def test_resume_command_quotes_and_replaces_paths():
    cmd = resume_command(
        "/w d", "/usr/bin/python", "run.py", ["task.milestones=[1]", "ckpt_path=old"], "o", "o/l"
    )
    cd, rest = cmd.split(" && ")
    assert shlex.split(cd) == ["cd", "/w d"]
    assert shlex.split(rest) == [
        "/usr/bin/python",
        "/w d/run.py",
        "task.milestones=[1]",
        "hydra.run.dir=/w d/o",
        "ckpt_path=/w d/o/l",
    ]
    again = resume_command(
        "/w", "py", "/r/run.py", ["ckpt_path=x", "train=false"], "o", None
    )
    assert again == "cd /w && py /r/run.py ckpt_path=x train=false hydra.run.dir=/w/o"


def test_last_checkpoint_is_written_after_the_monitored_ones():
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

    last = ModelCheckpoint(monitor=None)
    best = ModelCheckpoint(monitor="val/acc")
    recipe = ModelCheckpoint(monitor="train/loss")
    bar = TQDMProgressBar()
    assert order_checkpoints([last, bar, best, recipe]) == [best, bar, recipe, last]


def test_summary_schema():
    info = {"model": "dblock"}
    assert summary(info, {"test/samples": 3.0})["test/samples"] == 3
    assert summary(info, status="interrupted", signal="SIGTERM")["status"] == "interrupted"
    with pytest.raises(ValueError, match="status='done'"):
        summary(info, status="done")


# --- the cache checksum ---------------------------------------------------------------------


def tiny_store(seed: int = 0) -> EventStore:
    rng = np.random.default_rng(seed)
    n, e = 6, 40
    return EventStore(
        units=torch.from_numpy(rng.integers(0, 8, e).astype(np.int16)),
        bins=torch.from_numpy(rng.integers(0, 10, e).astype(np.int16)),
        offsets=torch.from_numpy(np.linspace(0, e, n + 1).astype(np.int64)),
        labels=torch.arange(n),
        n_in=8,
        t_len=10,
        dropped=torch.zeros(n, dtype=torch.long),
        raw_counts=torch.full((n,), e // n),
    )


def test_cache_entry_with_other_arrays_and_the_right_key_is_not_used(tmp_path):
    source = tmp_path / "src.h5"
    source.write_bytes(b"data")
    builds = []

    def build():
        builds.append(1)
        return tiny_store()

    def unreadable():
        raise DataError(f"cannot read {source}")

    first = cached_store(tmp_path / "cache", "x", [source], build, t_len=10)
    (entry,) = (tmp_path / "cache").glob("x-*.npz")
    with np.load(entry) as z:  # the same meta record (right key), other arrays
        arrays = {k: z[k] for k in z.files}
    arrays["units"] = (arrays["units"] + 1).astype(np.int16)
    with open(entry, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(DataError):  # not used silently, even when the source cannot be read
        cached_store(tmp_path / "cache", "x", [source], unreadable, t_len=10)
    again = cached_store(tmp_path / "cache", "x", [source], build, t_len=10)
    assert len(builds) == 2 and torch.equal(again.units, first.units)
    # a damaged byte in an array: the zip's own CRC-32 check catches it while reading
    info = zipfile.ZipFile(entry).getinfo("units.npy")
    raw = bytearray(entry.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + info.file_size - 3] ^= 1
    entry.write_bytes(bytes(raw))
    assert cache.load_store(entry, json.loads(str(np.load(entry)["meta"]))["key"]) is None


def test_cache_removes_temp_files_of_killed_writers(tmp_path):
    source = tmp_path / "src.h5"
    source.write_bytes(b"data")
    orphan = tmp_path / "cache" / f"x-0123.npz.{dead_pid()}.tmp"
    orphan.parent.mkdir()
    orphan.write_bytes(b"\0" * 100)
    cached_store(tmp_path / "cache", "x", [source], tiny_store, t_len=10)
    assert not orphan.exists()
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]
