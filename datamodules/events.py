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

from dblock.files import atomic_path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file and fix."""


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
    bins = np.round(np.asarray(times).astype(np.float64) * (1000.0 / dt_ms))
    keep = bins < t_len
    return bins, keep


def index_dtype(limit: int) -> np.dtype:
    """The smallest signed dtype holding values in [0, limit): int16 or int32."""
    return np.dtype(np.int16) if limit <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _sample_of(offsets: np.ndarray, flat_pos: int) -> int:
    """Index of the sample owning flat event ``flat_pos`` (offsets (n + 1,))."""
    return int(np.searchsorted(offsets, flat_pos, side="right") - 1)


def check_events(
    source: str,
    offsets: np.ndarray,
    flat_t: np.ndarray | None,
    flat_u: np.ndarray,
    labels: np.ndarray,
    n_in: int,
    n_classes: int | None,
    unit_name: str = "unit",
) -> None:
    """Raise ``DataError`` naming ``source`` and the first bad sample; vectorised checks.

    ``offsets`` (n + 1,), ``flat_t`` (E,) float times or None (unsigned integer times),
    ``flat_u`` (E,) channels, ``labels`` (n,).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(offsets) - 1:
        raise DataError(
            f"{source}: {len(offsets) - 1} samples of events but labels of shape {labels.shape}; "
            "the file is inconsistent. Delete it and fetch it again."
        )
    if flat_t is not None:
        bad = np.flatnonzero(~np.isfinite(flat_t) | (flat_t < 0))
        if len(bad):
            i, t = _sample_of(offsets, bad[0]), flat_t[bad[0]]
            raise DataError(
                f"{source}: sample {i} has a negative or non-finite time ({t}); times must be "
                "finite seconds >= 0. Fix or drop that sample, or fetch the file again."
            )
    bad = np.flatnonzero((flat_u < 0) | (flat_u >= n_in))
    if len(bad):
        i, u = _sample_of(offsets, bad[0]), int(flat_u[bad[0]])
        raise DataError(
            f"{source}: sample {i} has {unit_name} {u} outside [0, n_in={n_in}); largest is "
            f"{int(flat_u.max())}. Set dataset.n_in to at least {int(flat_u.max()) + 1} if the "
            "data are right, or fix the file."
        )
    if n_classes is not None and len(labels):
        bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{source}: sample {i} has label {int(labels[i])} outside [0, "
                f"n_classes={n_classes}); largest is {int(labels.max())}. Set dataset.n_classes "
                "to match the data, or fix the file."
            )


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
    counts = np.fromiter((len(t) for t in times), dtype=np.int64, count=len(times))
    unit_counts = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
    if len(units) != len(times) or not np.array_equal(counts, unit_counts):
        i = (
            int(np.flatnonzero(counts != unit_counts)[0])
            if len(units) == len(times)
            else min(len(units), len(times))
        )
        raise DataError(
            f"{source}: sample {i} has a different number of times and units; the file is "
            "inconsistent. Delete it and fetch it again."
        )
    flat_t = np.concatenate(times).astype(np.float64) if len(times) else np.zeros(0)
    flat_u = np.concatenate(units).astype(np.int64) if len(units) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    check_events(source, offsets, flat_t, flat_u, labels, n_in, n_classes)
    bins, _ = bin_events(flat_t, dt_ms, t_len)
    return store_from_flat(counts, bins, flat_u, labels, n_in, t_len)


H5_KEYS = ("spikes/times", "spikes/units", "labels")


def read_h5(
    path: Path, n_in: int, t_len: int, dt_ms: float, n_classes: int | None = None
) -> EventStore:
    """Read an SHD-layout HDF5 file (``spikes/times`` s, ``spikes/units``, ``labels``) in bulk."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    refetch = "Delete the file and fetch it again (or regenerate it)."
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_KEYS if k not in f]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)} (has {sorted(f.keys())}); it is not in "
                    f"the SHD layout (spikes/times, spikes/units, labels). {refetch}"
                )
            times = list(f["spikes/times"][:])
            units = list(f["spikes/units"][:])
            labels = np.asarray(f["labels"][:])
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, ValueError, TypeError, ...
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}). {refetch}") from err
    store = build_store(times, units, labels, n_in, t_len, dt_ms, n_classes, source=str(path))
    log.debug("%s: %d samples, %d events", path.name, len(store), store.n_events)
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
