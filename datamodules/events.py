"""The compact event store shared by every dataset, and the SHD-layout HDF5 reader/writer.

A split is held as flat arrays plus per-sample offsets, with times already binned for the
configured ``dt`` and ``T``. Dense time-major (T, B, n_in) count tensors are built from it on
whatever device the store lives on, by one scatter-add per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from datamodules.checks import (  # noqa: F401  (DataError: re-exported, imported from here)
    NUMBER,
    REFETCH,
    DataError,
    check_events,
    check_labels,
    flatten,
    path_status,
    time_hint,
)
from dblock.files import atomic_path

log = logging.getLogger(__name__)


@dataclass
class EventStore:
    """Events of one split: sample ``i`` owns ``units/bins[offsets[i]:offsets[i+1]]``."""

    units: Tensor  # (E,) int16 (int32 when n_in > 32767) input channel
    bins: Tensor  # (E,) int16 (int32 when t_len > 32767) time bin in [0, t_len)
    offsets: Tensor  # (n + 1,) int64
    labels: Tensor  # (n,) int64
    n_in: int
    t_len: int
    dropped: Tensor | None = None  # (n,) int64 events per sample dropped beyond T (None: unknown)
    raw_counts: Tensor | None = None  # (n,) int64 events per sample in the file, before dropping

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
        """Time-major count tensor (T, B, n_in) of samples ``idx`` (B,), contiguous, built on the
        store's device.

        On CPU it runs single-threaded: these memory-bound passes gain little from threads, and
        on a busy machine intra-op threads made them several times slower (measured).
        """
        if self.offsets.device.type != "cpu" or torch.get_num_threads() == 1:
            return self._dense(idx, dtype)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._dense(idx, dtype)
        finally:
            torch.set_num_threads(threads)

    def _dense(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        idx = idx.to(self.offsets.device, torch.long)
        dev, b, n_in = idx.device, idx.shape[0], self.n_in
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        total = int(counts.sum())
        # position of each gathered event in the flat arrays
        shift = torch.repeat_interleave(
            starts - (counts.cumsum(0) - counts), counts, output_size=total
        )
        pos = torch.arange(total, device=dev).add_(shift)
        # flat index (bin * B + row) * n_in + unit of the (T, B, n_in) output, in int64
        flat = torch.repeat_interleave(
            torch.arange(0, b * n_in, n_in, device=dev), counts, output_size=total
        )
        flat.add_(self.bins[pos], alpha=b * n_in).add_(self.units[pos])
        out = torch.zeros(self.t_len * b * n_in, dtype=dtype, device=dev)
        out.scatter_add_(0, flat, torch.ones(total, dtype=dtype, device=dev))
        return out.view(self.t_len, b, n_in)

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def bin_events(times: np.ndarray, dt_ms: float, t_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §6 binning of times in seconds: ``round(t * 1000 / dt)``; returns (bins, keep).

    Times are converted to float64 first, so float16 files (as SHD stores them) cannot overflow.
    """
    bins = np.round(np.asarray(times).astype(np.float64, copy=False) * (1000.0 / dt_ms))
    keep = bins < t_len
    return bins, keep


def index_dtype(limit: int) -> np.dtype:
    """The smallest signed dtype holding values in [0, limit): int16 or int32."""
    return np.dtype(np.int16) if limit <= np.iinfo(np.int16).max else np.dtype(np.int32)


def store_from_flat(
    counts: np.ndarray,
    bins: np.ndarray,
    units: np.ndarray,
    labels: np.ndarray,
    n_in: int,
    t_len: int,
) -> EventStore:
    """An ``EventStore`` from binned flat events; drops bins >= ``t_len`` and counts the drops.

    ``counts`` (n,) events per sample, ``bins`` and ``units`` (E,) in sample order.
    """
    n = len(counts)
    keep = bins < t_len
    sample = np.repeat(np.arange(n), counts)
    kept = np.bincount(sample[keep], minlength=n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    counts = np.asarray(counts, dtype=np.int64)
    return EventStore(
        units=torch.from_numpy(units[keep].astype(index_dtype(n_in))),
        bins=torch.from_numpy(bins[keep].astype(index_dtype(t_len))),
        offsets=torch.from_numpy(offsets),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        n_in=n_in,
        t_len=t_len,
        dropped=torch.from_numpy(counts - kept),
        raw_counts=torch.from_numpy(counts),
    )


def concat_stores(stores: list[EventStore]) -> EventStore:
    """One store holding the samples of ``stores`` in order (same ``n_in`` and ``t_len``)."""
    first = stores[0]
    offsets = [torch.zeros(1, dtype=torch.long)]
    base = 0
    for s in stores:
        offsets.append(s.offsets[1:] + base)
        base += s.n_events
    return EventStore(
        units=torch.cat([s.units for s in stores]),
        bins=torch.cat([s.bins for s in stores]),
        offsets=torch.cat(offsets),
        labels=torch.cat([s.labels for s in stores]),
        n_in=first.n_in,
        t_len=first.t_len,
        dropped=torch.cat([s.dropped for s in stores]),
        raw_counts=torch.cat([s.raw_counts for s in stores]),
    )


def build_store(
    times: list[np.ndarray],
    units: list[np.ndarray],
    labels: np.ndarray,
    n_in: int,
    t_len: int,
    dt_ms: float,
    n_classes: int | None = None,
    source: str = "events",
) -> EventStore:
    """Check and bin per-sample event lists (times in s) into an ``EventStore``.

    Events with bin >= T are dropped (and counted); empty samples are allowed (all-zero input).
    Bad values raise ``DataError`` naming ``source`` and the sample.
    """
    n = len(times)
    counts, flat_t = flatten(source, times, "times", "iuf")
    unit_counts, flat_u = flatten(source, units, "units", NUMBER)
    if len(units) != n or not np.array_equal(counts, unit_counts):
        i = int(np.flatnonzero(counts != unit_counts)[0]) if len(units) == n else min(len(units), n)
        raise DataError(
            f"{source}: sample {i} has a different number of times and units; the file is "
            "inconsistent. Delete it and fetch it again."
        )
    labels = check_labels(source, labels, n, n_classes)
    flat_t = flat_t.astype(np.float64, copy=False)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    check_events(source, offsets, flat_t, flat_u, n_in)
    bins, _ = bin_events(flat_t, dt_ms, t_len)
    return store_from_flat(counts, bins, flat_u, labels, n_in, t_len)


H5_KEYS = ("spikes/times", "spikes/units", "labels")


def read_h5(
    path: Path, n_in: int, t_len: int, dt_ms: float, n_classes: int | None = None
) -> EventStore:
    """Read an SHD-layout HDF5 file (``spikes/times`` s, ``spikes/units``, ``labels``) in bulk."""
    path = Path(path)
    status = path_status(path)
    if status != "found":
        raise DataError(f"dataset file {path} is {status}: put the file there, or fix the path")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_KEYS if k not in f]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)} (has {sorted(f.keys())}); it is not in "
                    f"the SHD layout (spikes/times, spikes/units, labels). {REFETCH}"
                )
            for key in H5_KEYS:
                obj = f[key]
                if not isinstance(obj, h5py.Dataset) or obj.ndim == 0:
                    kind = "a group" if isinstance(obj, h5py.Group) else "a single value"
                    raise DataError(
                        f"{path}: {key} is {kind}, not one entry per sample; the file is not in "
                        f"the SHD layout. {REFETCH}"
                    )
            times = list(f["spikes/times"][:])
            units = list(f["spikes/units"][:])
            labels = np.asarray(f["labels"][:])
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, ValueError, TypeError, ...
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}). {REFETCH}") from err
    store = build_store(times, units, labels, n_in, t_len, dt_ms, n_classes, source=str(path))
    log.debug("%s: %d samples, %d events", path.name, len(store), store.n_events)
    return store


def h5_max_time(path: Path) -> float | None:
    """The largest time stored in an SHD-layout file (None when unreadable or empty)."""
    try:
        with h5py.File(path, "r") as f:
            times = f["spikes/times"][:]
        flat = np.concatenate(list(times)) if len(times) else np.zeros(0)
        return float(np.max(flat)) if flat.size else None
    except Exception:  # only used to word an error message
        return None


def h5_time_hint(path: Path, t_len: int, dt_ms: float) -> str:
    """Why most events of an SHD-layout file fall beyond T, from its largest time."""
    t_max = h5_max_time(path)
    if t_max is None:
        return "check that the times are in seconds"
    return time_hint(t_max, t_len * dt_ms / 1000.0)


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

    The file appears atomically (``dblock.files.atomic_path``), with ``attrs`` on its root.
    """
    path = Path(path)
    # one temp file per process (parallel jobs) beside the target, fsynced, then renamed;
    # a failure removes it, and a killed writer's is removed at the next start
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        spikes = f.create_group("spikes")
        t_ds = spikes.create_dataset("times", (len(times),), dtype=h5py.vlen_dtype(np.float16))
        u_ds = spikes.create_dataset("units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (t, u) in enumerate(zip(times, units, strict=True)):
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
