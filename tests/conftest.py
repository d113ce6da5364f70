"""Shared fixtures: tiny datasets in the real file formats, written into tmp_path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

# The device the kernel equivalence tests run on: experiments/gpu_check.py sets it to cuda.
DEVICE = torch.device(os.environ.get("DBLOCK_TEST_DEVICE", "cpu"))


@pytest.fixture(params=["loop", "chunked"])
def kernel(request) -> str:
    """Every d-block kernel passes the same equivalence tests."""
    return request.param


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The run dir of one uninterrupted ``run.py RESUMABLE``: the baseline for resume,
    determinism and evaluation (tests/test_reliability.py, tests/test_interrupts.py)."""
    from tests.faults import RESUMABLE, run_cli  # imports Lightning: only when a test needs it

    tmp = tmp_path_factory.mktemp("reference")
    run_cli([*RESUMABLE, f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


# --- tiny datasets in the real formats -------------------------------------------------------

import numpy as np  # noqa: E402

from datamodules.hdf5 import write_h5  # noqa: E402


def random_events(n: int, n_in: int, n_classes: int, seed: int, t_max: float = 1.2):
    """``n`` samples of SHD-like events (times in s, float, sorted), all classes present."""
    rng = np.random.default_rng(seed)
    times, units = [], []
    for _ in range(n):
        k = int(rng.integers(1, 40))
        times.append(np.sort(rng.uniform(0.0, t_max, k)))
        units.append(rng.integers(0, n_in, k))
    labels = np.arange(n) % n_classes
    return times, units, labels


@pytest.fixture
def shd_dir(tmp_path):
    """``<root>/SHD/shd_{train,test}.h5`` with 40 / 20 samples, 700 units, 20 classes."""
    root = tmp_path / "data"
    for split, n, seed in (("train", 40, 0), ("test", 20, 1)):
        write_h5(root / "SHD" / f"shd_{split}.h5", *random_events(n, 700, 20, seed),
                 speakers=np.arange(n) % 3)
    return root


@pytest.fixture
def ssc_dir(tmp_path):
    """``<root>/SSC/ssc_{train,valid,test}.h5``, 700 units, 35 classes."""
    root = tmp_path / "data"
    for split, n, seed in (("train", 70, 0), ("valid", 35, 1), ("test", 35, 2)):
        write_h5(root / "SSC" / f"ssc_{split}.h5", *random_events(n, 700, 35, seed))
    return root


def encode_nmnist(x, y, p, t_us, overflow_after: int | None = None) -> bytes:
    """N-MNIST's 5-byte records (x, y, p << 7 | t[22:16], t[15:8], t[7:0]).

    ``overflow_after``: insert a timestamp-overflow record (y = 240) after that many events;
    times after it are stored minus 2**13 us, as the sensor does.
    """
    t_us = np.asarray(t_us, dtype=np.int64).copy()
    recs = []
    for i, (a, b, c, t) in enumerate(zip(x, y, p, t_us, strict=True)):
        if overflow_after is not None and i == overflow_after:
            recs.append([0, 240, 0, 0, 0])
        if overflow_after is not None and i >= overflow_after:
            t -= 2**13
        recs.append([a, b, (c << 7) | ((t >> 16) & 127), (t >> 8) & 255, t & 255])
    return np.asarray(recs, dtype=np.uint8).tobytes()


def nmnist_sample(rng, k: int = 30):
    x, y = rng.integers(0, 34, k), rng.integers(0, 34, k)
    p = rng.integers(0, 2, k)
    t = np.sort(rng.integers(0, 320_000, k))  # some beyond the first 300 ms
    return x, y, p, t


@pytest.fixture
def nmnist_dir(tmp_path):
    """``<root>/NMNIST/{Train,Test}/<digit>/<id>.bin``: 3 / 1 files per digit, one overflow."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for folder, per in (("Train", 3), ("Test", 1)):
        for digit in range(10):
            sub = root / "NMNIST" / folder / str(digit)
            sub.mkdir(parents=True)
            for j in range(per):
                x, y, p, t = nmnist_sample(rng)
                t[-5:] += 2**13 * (j == 0)  # stays sorted
                blob = encode_nmnist(x, y, p, t, overflow_after=25 if j == 0 else None)
                (sub / f"{digit * 100 + j:05d}.bin").write_bytes(blob)
    return root
