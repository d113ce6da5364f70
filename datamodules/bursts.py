"""The embedded default dataset: "bursts", a generated temporal-order task (no download).

Each sample holds two bursts of spikes on two groups of input channels, plus background noise.
The 10 classes are 5 group pairs x 2 orders: the two classes of a pair fire the same channels
the same number of times on average and differ only in which group fires first, so a model that
only counts spikes per channel cannot exceed about 50 %; the rest needs time.

The events are generated once, deterministically from a seed, and written in the exact SHD
HDF5 layout under ``<data_dir>/BURSTS/``, then read back by the same loader SHD uses. Each file
is named by a hash of the settings that generated it (``bursts_train-<key>.h5``): parallel jobs
with other settings write other files, so no job ever reads another's data; jobs with the same
settings write the same bytes (each through its own temp file, renamed atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import h5py
import numpy as np

from datamodules.base import EventDataModule
from datamodules.checks import DataError, path_status
from datamodules.hdf5 import h5_time_hint, read_h5, write_h5
from datamodules.store import EventStore
from dblock.values import positive_int

log = logging.getLogger(__name__)

PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (1, 6))


def generate(
    n_samples: int,
    seed: int,
    n_in: int = 64,
    n_groups: int = 8,
    duration_s: float = 0.1,
    burst_rate: float = 4.0,
    jitter_s: float = 0.003,
    noise_hz: float = 20.0,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Event lists (times in s, units) and labels of ``n_samples`` burst-order samples."""
    rng = np.random.default_rng(seed)
    group = n_in // n_groups
    labels = rng.integers(0, 2 * len(PAIRS), size=n_samples)
    times, units = [], []
    for label in labels:
        first, second = PAIRS[label // 2]
        if label % 2:
            first, second = second, first
        onset = rng.uniform(0.1, 0.3) * duration_s
        gap = rng.uniform(0.1, 0.2) * duration_s
        t_parts, u_parts = [], []
        for g, centre in ((first, onset), (second, onset + gap)):
            counts = rng.poisson(burst_rate, size=group)
            u = np.repeat(np.arange(g * group, (g + 1) * group), counts)
            t_parts.append(centre + rng.normal(0.0, jitter_s, size=u.shape[0]))
            u_parts.append(u)
        n_noise = rng.poisson(noise_hz * duration_s * n_in)
        t_parts.append(rng.uniform(0.0, duration_s, size=n_noise))
        u_parts.append(rng.integers(0, n_in, size=n_noise))
        t = np.clip(np.concatenate(t_parts), 0.0, duration_s * 0.999)
        u = np.concatenate(u_parts)
        order = np.argsort(t, kind="stable")
        times.append(t[order])
        units.append(u[order])
    return times, units, labels


class BurstsDataModule(EventDataModule):
    """The generated burst-order dataset in SHD layout: ``BURSTS/bursts_{train,test}-<key>.h5``,
    ``<key>`` a hash of the generator's settings of that split.

    Args:
        data_dir: the data root; the files are generated into ``<data_dir>/BURSTS/``.
        n_in: input channels (8 groups of ``n_in // 8``; default 64).
        n_classes: must be 10 (5 group pairs x 2 orders).
        t_len: T, time steps per sample (default 100).
        dt_ms: bin width in ms (default 1: 100 ms samples).
        n_train: samples in the generated train file (validation is held out of it).
        n_test: samples in the generated test file.
        data_seed: generator seed (the test file uses ``data_seed + 1``).
        **kwargs: the ``EventDataModule`` settings (``batch_size``, ``val_fraction``,
            ``split_seed``, ``cache``, ``cache_dir``, ``max_dropped_fraction``, ``input``).
    """

    name = "bursts"
    generated = True

    def __init__(
        self,
        data_dir: str | Path,
        n_in: int = 64,
        n_classes: int = 10,
        t_len: int = 100,
        dt_ms: float = 1.0,
        n_train: int = 4096,
        n_test: int = 1024,
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(data_dir, n_in, n_classes, t_len, dt_ms, **kwargs)
        if n_classes != 2 * len(PAIRS):
            raise ValueError(f"bursts has {2 * len(PAIRS)} classes, got n_classes={n_classes}")
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            positive_int(f"dataset.{name}", n)
        self.sizes = {"train": n_train, "test": n_test}
        self.data_seed = data_seed

    def path(self, split: str) -> Path:
        """The file of ``split`` (SHD layout, docs/model.md §6), named by its generator's
        settings."""
        return self.data_dir / "BURSTS" / f"bursts_{split}-{self._params(split)[:12]}.h5"

    def source(self, split: str) -> str:
        return str(self.path(split))

    def empty_fix(self, split: str) -> str:
        return f"Delete it: it is generated again (dataset.n_{split} samples)."

    def time_hint(self, split: str) -> str:
        return h5_time_hint(self.path(split), self.t_len, self.dt_ms)

    def _params(self, split: str) -> str:
        spec = {
            "n": self.sizes[split],
            "seed": self.data_seed + (split == "test"),
            "n_in": self.n_in,
        }
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def prepare_data(self) -> None:
        """Write the files once; regenerate only when the generator's parameters change."""
        for split in ("train", "test"):
            path, key = self.path(split), self._params(split)
            status = path_status(path)
            if status not in ("found", "missing"):
                raise DataError(
                    f"bursts: {path} is {status}, where the generated {split} file goes. "
                    "Remove or rename it, then run again."
                )
            if status == "found":
                try:
                    with h5py.File(path, "r") as f:
                        if f.attrs.get("generator") == key:
                            continue
                except OSError:
                    pass
            log.info("generating %s (%d samples)", path, self.sizes[split])
            times, units, labels = generate(
                self.sizes[split], self.data_seed + (split == "test"), n_in=self.n_in
            )
            write_h5(path, times, units, labels, attrs={"generator": key})

    def load_split(self, split: str) -> EventStore:
        path = self.path(split)
        if not path.is_file():  # the name holds the settings: the file is this job's data
            self.prepare_data()
        return self.load_cached(
            split, [path], lambda: read_h5(path, self.n_in, self.t_len, self.dt_ms, self.n_classes)
        )
