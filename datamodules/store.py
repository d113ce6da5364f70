"""The event store: every sample's (unit, bin) events in flat arrays, binned once, from which
each batch is built (dense or sparse, ``datamodules/batches.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from datamodules.batches import BatchBuffers, dense_batch, sparse_batch
from datamodules.checks import (
    NUMBER,
    DataError,
    check_events,
    check_labels,
    flatten,
)

CHUNK_EVENTS = 1 << 24  # events sorted at once when a store is put in order (bounds memory)


@dataclass
class EventStore:
    """Events of one split: sample ``i`` owns ``units/bins/repeats[offsets[i]:offsets[i+1]]``.

    Each sample's entries are sorted by (bin, unit) and unique; ``repeats`` counts the events of
    the sample at that (bin, unit) (docs/model.md §6: a repeated (unit, bin) adds up). Built without
    ``repeats`` (raw events, one per entry, in any order), the store puts itself in that form.
    """

    units: Tensor  # (E,) int16 (int32 when n_in > 32767) input channel
    bins: Tensor  # (E,) int16 (int32 when t_len > 32767) time bin in [0, t_len)
    offsets: Tensor  # (n + 1,) int64
    labels: Tensor  # (n,) int64
    n_in: int
    t_len: int
    dropped: Tensor | None = None  # (n,) int64 events per sample dropped beyond T (None: unknown)
    raw_counts: Tensor | None = None  # (n,) int64 events per sample in the file, before dropping
    repeats: Tensor | None = None  # (E,) int16 (int32 if needed) events merged into each entry

    def __post_init__(self) -> None:
        if self.repeats is None:
            self.units, self.bins, self.repeats, self.offsets = canonical_events(
                self.units, self.bins, self.offsets, self.n_in, self.t_len
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def n_entries(self) -> int:
        """Distinct (sample, bin, unit) entries: the non-zeros of all the samples' inputs."""
        return self.units.shape[0]

    @property
    def n_events(self) -> int:
        """Events (input spikes) kept in the store."""
        return int(self.repeats.sum())

    @cached_property
    def single(self) -> bool:
        """Whether every entry is one event (no repeated (sample, bin, unit))."""
        return self.n_entries == 0 or int(self.repeats.max()) == 1

    def sample_events(self, idx: Tensor) -> Tensor:
        """Events kept per sample of ``idx`` (B,), int64."""
        if self.raw_counts is not None and self.dropped is not None:
            return (self.raw_counts - self.dropped)[idx]
        ends = torch.cat([self.repeats.new_zeros(1, dtype=torch.long), self.repeats.cumsum(0)])
        return ends[self.offsets[idx + 1]] - ends[self.offsets[idx]]

    @cached_property
    def bin_counts(self) -> Tensor:
        """(n, t_len) entries of each sample in each bin, on the store's device (computed once,
        chunked over samples; used to build sparse batches without sorting)."""
        n, t_len = len(self), self.t_len
        dtype = torch.int16 if self.n_in <= torch.iinfo(torch.int16).max else torch.int32
        out = torch.zeros(n, t_len, dtype=dtype, device=self.offsets.device)
        for lo, hi in sample_chunks(self.offsets):
            a, e = int(self.offsets[lo]), int(self.offsets[hi])
            per = self.offsets[lo + 1 : hi + 1] - self.offsets[lo:hi]
            key = torch.repeat_interleave(
                torch.arange(0, (hi - lo) * t_len, t_len, device=per.device), per, output_size=e - a
            ).add_(self.bins[a:e])
            out[lo:hi] = torch.bincount(key, minlength=(hi - lo) * t_len).view(hi - lo, t_len)
        return out

    def to(self, device: torch.device | str) -> EventStore:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        store = EventStore(**moved)
        store.single = self.single  # read here, on the host: no read back from the device
        return store

    def dense(
        self,
        idx: Tensor,
        dtype: torch.dtype = torch.float32,
        buffers: BatchBuffers | None = None,
        entries: int | None = None,
    ) -> Tensor:
        """Time-major count tensor (T, B, n_in) of samples ``idx`` (B,), contiguous, built on the
        store's device. With ``buffers`` its memory is reused from an earlier batch that nothing
        refers to any more (see ``BatchBuffers``); without, it is a new tensor. ``entries``: the
        batch's entries if the caller counted them on the host (else read from the device)."""
        return dense_batch(self, idx, dtype, buffers, entries)

    def sparse(
        self, idx: Tensor, dtype: torch.dtype = torch.float32, entries: int | None = None
    ) -> Tensor:
        """The same counts as ``dense`` as a coalesced sparse COO tensor (T, B, n_in), built on
        the store's device with no dense tensor: ``sparse(idx).to_dense()`` equals
        ``dense(idx)``. Its indices are sorted by (t, b, unit), as ``Projection`` reads them.
        ``entries`` as in ``dense``."""
        return sparse_batch(self, idx, dtype, entries)

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sample_chunks(offsets: Tensor, limit: int = CHUNK_EVENTS) -> list[tuple[int, int]]:
    """Consecutive sample ranges ``[lo, hi)`` of at most ``limit`` events each (a longer sample
    gets a range of its own), covering every sample."""
    n = offsets.shape[0] - 1
    bounds = offsets.cpu()
    chunks, lo = [], 0
    while lo < n:
        hi = int(torch.searchsorted(bounds, bounds[lo] + limit, right=True)) - 1
        hi = min(max(hi, lo + 1), n)
        chunks.append((lo, hi))
        lo = hi
    return chunks


def canonical_events(
    units: Tensor, bins: Tensor, offsets: Tensor, n_in: int, t_len: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw events in sample order -> each sample's entries sorted by (bin, unit), a repeated
    (bin, unit) held once: returns (units, bins, repeats, offsets), dtypes kept.

    One sort of the key (sample, bin, unit) per chunk of samples (no argsort: the key holds every
    field), then a count of equal neighbours.
    """
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    per_sample = [offsets.new_zeros(1)]
    for lo, hi in sample_chunks(offsets):
        a, e = int(offsets[lo]), int(offsets[hi])
        per = offsets[lo + 1 : hi + 1] - offsets[lo:hi]
        sample = torch.repeat_interleave(
            torch.arange(hi - lo, device=offsets.device), per, output_size=e - a
        )
        key = (sample * t_len + bins[a:e]) * n_in + units[a:e]
        entries, repeats = torch.unique_consecutive(torch.sort(key).values, return_counts=True)
        cell = torch.div(entries, n_in, rounding_mode="floor")
        parts.append((entries - cell * n_in, cell % t_len, repeats))
        per_sample.append(torch.bincount(cell // t_len, minlength=hi - lo))
    if not parts:
        empty = units.new_zeros(0)
        return empty, bins.new_zeros(0), torch.zeros(0, dtype=torch.int16), offsets
    repeats = torch.cat([r for _, _, r in parts])
    small = repeats.numel() == 0 or int(repeats.max()) <= torch.iinfo(torch.int16).max
    narrow = torch.int16 if small else torch.int32
    return (
        torch.cat([u for u, _, _ in parts]).to(units.dtype),
        torch.cat([b for _, b, _ in parts]).to(bins.dtype),
        repeats.to(narrow),
        torch.cumsum(torch.cat(per_sample), 0),
    )


def bin_events(times: np.ndarray, dt_ms: float, t_len: int) -> tuple[np.ndarray, np.ndarray]:
    """docs/model.md §6 binning of times in seconds: ``round(t * 1000 / dt)``; returns (bins, keep).

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
        base += s.n_entries
    return EventStore(
        units=torch.cat([s.units for s in stores]),
        bins=torch.cat([s.bins for s in stores]),
        offsets=torch.cat(offsets),
        labels=torch.cat([s.labels for s in stores]),
        n_in=first.n_in,
        t_len=first.t_len,
        dropped=torch.cat([s.dropped for s in stores]),
        raw_counts=torch.cat([s.raw_counts for s in stores]),
        repeats=torch.cat([s.repeats for s in stores]),
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
