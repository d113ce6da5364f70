"""The compact event store shared by every dataset, and the SHD-layout HDF5 reader/writer.

A split is held as flat arrays plus per-sample offsets, with times already binned for the
configured ``dt`` and ``T``. Dense (B, n_in, T) count tensors are built from it on whatever
device the store lives on, by one scatter-add per batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file and fix."""


@dataclass
class EventStore:
    """Events of one split: sample ``i`` owns ``units/bins[offsets[i]:offsets[i+1]]``."""

    units: Tensor  # (E,) int32 input channel
    bins: Tensor  # (E,) int32 time bin in [0, t_len)
    offsets: Tensor  # (n + 1,) int64
    labels: Tensor  # (n,) int64
    n_in: int
    t_len: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def n_events(self) -> int:
        return self.units.shape[0]

    def to(self, device: torch.device | str) -> EventStore:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return EventStore(**moved)

    def dense(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Count tensor (B, n_in, T) of samples ``idx`` (B,), built on the store's device."""
        idx = idx.to(self.offsets.device, torch.long)
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(idx.shape[0], device=idx.device), counts)
        # position of each gathered event in the flat arrays
        shift = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts)
        pos = torch.arange(total, device=idx.device) + shift
        flat = (rows * self.n_in + self.units[pos].long()) * self.t_len + self.bins[pos].long()
        out = torch.zeros(idx.shape[0] * self.n_in * self.t_len, dtype=dtype, device=idx.device)
        out.index_add_(0, flat, torch.ones(total, dtype=dtype, device=idx.device))
        return out.view(idx.shape[0], self.n_in, self.t_len)

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def bin_events(
    times: np.ndarray, dt_ms: float, t_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §6 binning of times in seconds: ``round(t * 1000 / dt)``; returns (bins, keep)."""
    bins = np.round(times.astype(np.float64) * (1000.0 / dt_ms))
    keep = bins < t_len
    return bins, keep


def build_store(
    times: list[np.ndarray],
    units: list[np.ndarray],
    labels: np.ndarray,
    n_in: int,
    t_len: int,
    dt_ms: float,
) -> EventStore:
    """Bin per-sample event lists into an ``EventStore``; events with bin >= T are dropped."""
    counts = np.fromiter((len(t) for t in times), dtype=np.int64, count=len(times))
    flat_t = np.concatenate(times) if len(times) else np.zeros(0)
    flat_u = np.concatenate(units).astype(np.int64) if len(units) else np.zeros(0, np.int64)
    bins, keep = bin_events(flat_t, dt_ms, t_len)
    sample = np.repeat(np.arange(len(times)), counts)[keep]
    offsets = np.zeros(len(times) + 1, dtype=np.int64)
    np.cumsum(np.bincount(sample, minlength=len(times)), out=offsets[1:])
    return EventStore(
        units=torch.from_numpy(flat_u[keep].astype(np.int32)),
        bins=torch.from_numpy(bins[keep].astype(np.int32)),
        offsets=torch.from_numpy(offsets),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        n_in=n_in,
        t_len=t_len,
    )


def read_h5(path: Path, n_in: int, t_len: int, dt_ms: float) -> EventStore:
    """Read an SHD-layout HDF5 file (``spikes/times`` in s, ``spikes/units``, ``labels``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            times = list(f["spikes/times"][:])
            units = list(f["spikes/units"][:])
            labels = f["labels"][:]
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read {path}: {err}. Delete the file and fetch it again.") from err
    store = build_store(times, units, labels, n_in, t_len, dt_ms)
    log.info("%s: %d samples, %d events", path.name, len(store), store.n_events)
    return store


def write_h5(
    path: Path,
    times: list[np.ndarray],
    units: list[np.ndarray],
    labels: np.ndarray,
    speakers: np.ndarray | None = None,
    keys: list[str] | None = None,
    attrs: dict | None = None,
) -> None:
    """Write events in the SHD HDF5 layout: vlen float16 times (s), vlen uint16 units.

    The file appears atomically (written aside, then renamed), with ``attrs`` on its root.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: parallel jobs
    with h5py.File(tmp, "w") as f:
        spikes = f.create_group("spikes")
        t_ds = spikes.create_dataset("times", (len(times),), dtype=h5py.vlen_dtype(np.float16))
        u_ds = spikes.create_dataset("units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (t, u) in enumerate(zip(times, units)):
            t_ds[i] = np.asarray(t, dtype=np.float16)
            u_ds[i] = np.asarray(u, dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        extra = f.create_group("extra")
        n_classes = int(np.max(labels)) + 1 if len(labels) else 0
        names = keys if keys is not None else [f"class_{c}" for c in range(n_classes)]
        extra.create_dataset("keys", data=np.array(names, dtype=h5py.string_dtype()))
        spk = speakers if speakers is not None else np.zeros(len(labels), dtype=np.uint16)
        extra.create_dataset("speaker", data=np.asarray(spk, dtype=np.uint16))
        f.attrs.update(attrs or {})
    tmp.replace(path)
