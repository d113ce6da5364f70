"""Data files under faults: parallel jobs sharing a data dir, full disks while data is generated,
read-only data dirs, kills during a download's extraction, damaged cache entries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.bursts import BurstsDataModule
from tests.faults import TINY, on_read_only, on_small_disk, run_cli, run_env

ROOT = Path(__file__).resolve().parents[1]


# --- W1: generated data is keyed by its settings ----------------------------------------------


def test_jobs_with_other_generated_settings_never_read_each_others_data(tmp_path):
    """One job generates, a second job with another n_train generates into the same data dir,
    then the first reads its split: it must get its own samples, not the second's."""
    a = BurstsDataModule(tmp_path, n_train=32, n_test=8, val_fraction=0, cache=False)
    b = BurstsDataModule(tmp_path, n_train=64, n_test=8, val_fraction=0, cache=False)
    a.prepare_data()
    b.prepare_data()
    assert len(a.load_split("train")) == 32
    assert len(b.load_split("train")) == 64
    c = BurstsDataModule(tmp_path, n_train=32, n_test=8, data_seed=1, val_fraction=0, cache=False)
    c.prepare_data()
    assert not (a.load_split("train").labels == c.load_split("train").labels).all()


CONCURRENT = """
import sys
from datamodules.bursts import BurstsDataModule
from tests.conftest import shd_dir  # noqa: F401  (fixture)
from tests.faults import TINY, on_read_only, on_small_disk, run_env
root, n = sys.argv[1], int(sys.argv[2])
got = []
for seed in range(4):
    dm = BurstsDataModule(root, n_train=n, n_test=8, data_seed=seed, val_fraction=0,
                          cache=seed % 2 == 0)
    dm.prepare_data()
    dm.setup()
    got.append(len(dm.stores["train"]))
print(*got)
"""


def test_concurrent_processes_with_other_sizes_read_their_own_data(tmp_path):
    """Real concurrent processes over one data dir, each generating and reading its own size
    for the same seeds (the ``-m dataset.n_train=256,4096`` joblib sweep of issue 16, W1)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    sizes = (100, 400, 100, 400)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path), str(n)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for n in sizes
    ]
    for n, proc in zip(sizes, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert out.split() == [str(n)] * 4, (n, out)


# --- C1: a full disk while the generated data is written ------------------------------------


def test_full_disk_while_generating_data_is_one_line_exit_3(tmp_path):
    """A real 64 KiB filesystem as the data dir: generating bursts runs out of space. One
    ``error:`` line naming the file, exit 3, no traceback, no crash of libhdf5 (was exit 139)."""
    data = tmp_path / "small"
    done = on_small_disk(
        [sys.executable, ROOT / "run.py", *TINY, "dataset.n_train=2048", "logger=none",
         f"paths.data_dir={data}", f"hydra.run.dir={tmp_path / 'run'}"],
        data, "64k", cwd=tmp_path, env=run_env(tmp_path),
    )
    assert done.returncode == 3, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on the device writing {data}/BURSTS/")
    assert "Traceback" not in done.stdout + done.stderr


# --- U1: complete files in a read-only data dir ---------------------------------------------


def test_complete_shd_files_in_a_read_only_data_dir_are_read(shd_dir, tmp_path):
    """Downloading is on by default, but nothing is missing: the run reads the files, and the
    cache that cannot be written costs only a warning (was: refused, "cannot be created or
    written")."""
    done = on_read_only(
        [sys.executable, ROOT / "run.py", "dataset=shd", f"paths.data_dir={shd_dir}",
         "debug=default", "n_hidden=8", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        shd_dir, cwd=tmp_path, env=run_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot write the cache" in done.stderr + done.stdout
    assert (tmp_path / "run" / "results.json").is_file()
    assert sorted(p.name for p in shd_dir.iterdir()) == ["SHD"]  # nothing written there


# --- U3: a kill during the download's extraction --------------------------------------------

EXTRACT_AND_DIE = """
import os, shutil, signal, sys, urllib.error, urllib.request
import tonic
from datamodules.tonic_datasets import SHDDataModule

def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

urllib.request.urlopen = offline  # the archive in place must be reused: nothing is fetched
tonic.datasets.SHD.train_md5 = sys.argv[2]
if sys.argv[3] == "die":
    copy = shutil.copyfileobj

    def copy_then_die(src, dst, length=0):  # zipfile's extraction: part of the bytes, then kill -9
        dst.write(src.read(4096))
        dst.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.copyfileobj = copy_then_die
dm = SHDDataModule(sys.argv[1], n_in=700, n_classes=20, t_len=500, dt_ms=2.0, val_fraction=0)
print(len(dm.load_split("train")))
"""


def test_kill_during_extraction_leaves_no_partial_file_and_the_archive_is_reused(tmp_path):
    """A verified archive in place, a kill -9 in the middle of tonic's extraction, then a rerun
    offline: no partial shd_train.h5 is left (was: a cut file that stopped every rerun), and the
    rerun extracts the archive already there (its md5 checked by tonic) without a download."""
    import hashlib
    import zipfile

    from datamodules.hdf5 import write_h5
    from tests.conftest import random_events

    src = tmp_path / "src" / "shd_train.h5"
    write_h5(src, *random_events(40, 700, 20, 0))
    folder = tmp_path / "data" / "SHD"
    folder.mkdir(parents=True)
    archive = folder / "shd_train.h5.zip"
    with zipfile.ZipFile(archive, "w") as z:  # the real archive's layout: the file at its root
        z.write(src, "shd_train.h5")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def run(mode):
        return subprocess.run(
            [sys.executable, "-c", EXTRACT_AND_DIE, tmp_path / "data", md5, mode],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )

    killed = run("die")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (folder / "shd_train.h5").exists()
    assert archive.read_bytes() and hashlib.md5(archive.read_bytes()).hexdigest() == md5
    rerun = run("live")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.splitlines()[-1] == "40"
    assert "Using downloaded and verified file" in rerun.stdout  # tonic's md5 check, no fetch
    assert (folder / "shd_train.h5").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["shd_train.h5", "shd_train.h5.zip"]


# --- W4: what the cache's checksums protect, and entries checked as data ---------------------


def test_cache_entry_with_recomputed_checksums_is_still_checked_as_data(shd_dir):
    """The checksums live in the entry: rewriting the arrays with their checksums passes them.
    Such an entry is still data, never trusted: arrays out of range for the run's settings
    (units beyond n_in, bins beyond T) or a record whose sizes differ from the run's are
    rebuilt from the source, not used (was: loaded, sizes taken from the entry's own record)."""
    import json

    import numpy as np
    import torch

    from datamodules import cache
    from datamodules.tonic_datasets import SHDDataModule

    dm = SHDDataModule(shd_dir, n_in=700, n_classes=20, t_len=500, dt_ms=2.0)
    ref = dm.load_split("train")
    (entry,) = (shd_dir / "cache" / "shd").glob("shd_train-*.npz")
    key = entry.stem.split("-")[-1]
    fields = ("units", "bins", "offsets", "labels", "dropped", "raw_counts", "repeats")
    arrays = {k: getattr(ref, k).clone() for k in fields}
    bad_units = dict(arrays, units=arrays["units"] + 700)  # beyond n_in, checksums recomputed
    bad_size = dict(arrays)
    for tampered, n_in in ((bad_units, 700), (bad_size, 800)):
        store = cache.EventStore(n_in=n_in, t_len=500, **tampered)
        cache.save_store(entry, store, key)
        with np.load(entry) as z:  # its own checksums pass
            crc = {i.filename: i.CRC for i in z.zip.infolist() if i.filename != "meta.npy"}
            assert crc == json.loads(str(z["meta"]))["crc"]
        again = SHDDataModule(shd_dir, n_in=700, n_classes=20, t_len=500, dt_ms=2.0)
        loaded = again.load_split("train")
        assert loaded.n_in == 700 and torch.equal(loaded.units, ref.units)


# --- parallel jobs: their own data, labelled lines ------------------------------------------


@pytest.mark.slow
def test_parallel_joblib_sweep_jobs_read_their_own_data_and_label_their_lines(tmp_path):
    """The sweep of issue 16, W1, through run.py: two jobs side by side (joblib) on a fresh
    data dir, each generating its own data. Each job logs its own sample count, and every line
    a job prints carries its label (its folder: the value it sweeps)."""
    out = tmp_path / "sweep"
    proc = run_cli(
        ["-m", *TINY, "dataset.n_train=200,400", "trainer.max_epochs=1", "logger=none",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={out}"],
        tmp_path,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    for n in (200, 400):
        label = f"[dataset.n_train={n}] "
        own = "\n".join(line[len(label):] for line in lines if line.startswith(label))
        train = re.search(r"^bursts train: (\d+) samples", own, re.M)
        val = re.search(r"^bursts val: (\d+) samples", own, re.M)
        assert train and val and int(train[1]) + int(val[1]) == n, own
        assert re.search(r"^epoch 1/1: ", own, re.M) and re.search(r"^dblock d=10", own, re.M)
    # job lines are all labelled; the rest is the sweep's own: Hydra's launcher lines, the sweep
    # summary printed once at its end, and joblib's shutdown note about its memory-map folders
    summary = lines.index(next(line for line in lines if line.startswith("sweep summary (")))
    unlabelled = [line for line in lines[:summary] if not line.startswith("[")]
    assert all("Launching" in line or "#" in line or "resource_tracker" in line
               or "joblib" in line for line in unlabelled), unlabelled
    joblib_note = ("joblib" in line or "resource_tracker" in line or line.startswith(" ")
                   for line in lines[summary:])  # its warning and the warnings.warn( line
    assert all(line.startswith(("|", "->", "[", "sweep")) or note
               for line, note in zip(lines[summary:], joblib_note, strict=True)), lines[summary:]
