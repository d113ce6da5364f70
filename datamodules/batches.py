"""Batches from the event store, built on the store's device: dense (T, B, n_in) counts, or the
same counts as a sparse COO tensor.

- ``dense_batch``: one scatter-add of the batch's entries into a (T, B, n_in) tensor, whose
  memory ``BatchBuffers`` reuses from one batch to the next.
- ``sparse_batch``: the entries put in (t, b, unit) order by a counting sort (no comparison sort:
  each sample's entries are already sorted by (bin, unit) in the store, so the batch is the
  samples' runs of equal bin, interleaved), as a coalesced COO tensor with the counts as values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

INPUTS = ("auto", "dense", "sparse")  # dataset.input: the batch format (datamodules/base.py)


def check_input_format(value) -> None:
    """Raise ``ValueError`` naming ``dataset.input`` unless ``value`` is a batch format."""
    if value not in INPUTS:
        raise ValueError(f"dataset.input={value!r} is unknown; choose one of: {', '.join(INPUTS)}")


class EventStore(Protocol):
    """What a batch is built from: ``datamodules.store.EventStore`` (named here as a protocol,
    so that this module, which the store calls, does not import it back)."""

    t_len: int
    n_in: int
    units: Tensor
    bins: Tensor
    offsets: Tensor
    repeats: Tensor | None
    single: bool
    n_entries: int
    bin_counts: Tensor


def single_threaded(build):
    """Run a CPU batch build on one thread: these memory-bound passes gain little from threads,
    and on a busy machine intra-op threads made them several times slower (measured)."""

    @functools.wraps(build)
    def wrapper(store: EventStore, idx: Tensor, *args):
        if store.offsets.device.type != "cpu" or torch.get_num_threads() == 1:
            return build(store, idx, *args)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return build(store, idx, *args)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@single_threaded
def dense_batch(
    store: EventStore,
    idx: Tensor,
    dtype: torch.dtype,
    buffers: BatchBuffers | None,
    entries: int | None = None,
) -> Tensor:
    """(T, B, n_in) counts of samples ``idx`` (B,), contiguous (see ``EventStore.dense``).
    ``entries``: the batch's entries, counted on the host (None: read back from the device)."""
    idx = idx.to(store.offsets.device, torch.long)
    dev, b, n_in = idx.device, idx.shape[0], store.n_in
    starts = store.offsets[idx]
    counts = store.offsets[idx + 1] - starts
    take = sliced_events if dev.type == "cpu" else gathered_events
    arrays = (store.bins, store.units) + (() if store.single else (store.repeats,))
    bins, units, *repeats = take(arrays, starts, counts, entries)
    # flat index (bin * B + row) * n_in + unit of the (T, B, n_in) output, in int64
    flat = torch.repeat_interleave(
        torch.arange(0, b * n_in, n_in, device=dev), counts, output_size=bins.shape[0]
    )
    flat.add_(bins, alpha=b * n_in).add_(units)
    if repeats:
        values = repeats[0].to(dtype)
    else:
        values = torch.ones(flat.shape[0], dtype=dtype, device=dev)
    numel = store.t_len * b * n_in
    if buffers is None:
        out = torch.zeros(numel, dtype=dtype, device=dev).scatter_add_(0, flat, values)
    else:
        out = buffers.scatter_add(numel, flat, values)
    return out.view(store.t_len, b, n_in)


@single_threaded
def sparse_batch(
    store: EventStore, idx: Tensor, dtype: torch.dtype, entries: int | None = None
) -> Tensor:
    """Coalesced sparse COO (T, B, n_in) counts of samples ``idx`` (see ``EventStore.sparse``).

    With ``n[b, t]`` the entries of sample ``idx[b]`` in bin t (``store.bin_counts``), the run of
    (t, b) starts at ``src = offsets[idx[b]] + sum_{t' < t} n[b, t']`` in the store and at
    ``dst = sum_{(t', b') < (t, b)} n[b', t']`` in the batch; entry ``p`` of the batch, in run
    ``r(p)``, is store entry ``p + src[r(p)] - dst[r(p)]``. ``entries`` (the batch's non-zeros,
    counted on the host) spares reading their number back from the device.
    """
    t_len, n_in = store.t_len, store.n_in
    idx = idx.to(store.offsets.device, torch.long)
    dev, b = idx.device, idx.shape[0]
    # positions in int32 where the store allows (half the memory traffic of int64)
    small = store.n_entries < torch.iinfo(torch.int32).max
    pdt = torch.int32 if small else torch.long
    per_bin = store.bin_counts[idx]  # (B, T)
    per_run = per_bin.t().reshape(-1).to(pdt)  # (T * B,) entries per (t, b), in (t, b) order
    ends = per_run.cumsum(0, dtype=pdt)  # dst + n per run
    if entries is not None:
        nnz = entries
    else:
        nnz = int(ends[-1]) if ends.numel() else 0
    src = per_bin.cumsum(1, dtype=pdt).sub_(per_bin).add_(store.offsets[idx].to(pdt)[:, None])
    shift = src.t().reshape(-1).sub_(ends).add_(per_run)  # src - dst per run
    run = torch.repeat_interleave(per_run, output_size=nnz)  # (nnz,) run t * B + b of each entry
    t_of, b_of = _run_tables(t_len, b, dev)
    indices = torch.empty(3, nnz, dtype=torch.long, device=dev)
    torch.index_select(t_of, 0, run, out=indices[0])
    torch.index_select(b_of, 0, run, out=indices[1])
    pos = shift.index_select(0, run).add_(torch.arange(nnz, dtype=pdt, device=dev))
    indices[2] = store.units.index_select(0, pos)
    if store.single:
        values = torch.ones(nnz, dtype=dtype, device=dev)
    else:
        values = store.repeats.index_select(0, pos).to(dtype)
    return torch.sparse_coo_tensor(
        indices, values, (t_len, b, n_in), is_coalesced=True, check_invariants=False
    )


@functools.lru_cache(maxsize=8)
def _run_tables(t_len: int, b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """t and b of each run ``t * B + b`` (two (T * B,) int64 tables, kept for the last shapes)."""
    t_of = torch.arange(t_len, device=device).repeat_interleave(b)
    return t_of, torch.arange(b, device=device).repeat(t_len)


def sliced_events(
    arrays: tuple[Tensor, ...], starts: Tensor, counts: Tensor, total: int | None = None
) -> list[Tensor]:
    """Each of ``arrays`` (E,) restricted to the samples starting at ``starts`` with ``counts``
    entries, in order: one slice per sample (each sample's entries are contiguous),
    concatenated. The CPU path: no index arithmetic, one memory copy per array."""
    spans = list(zip(starts.tolist(), (starts + counts).tolist(), strict=True))
    return [torch.cat([a[s:e] for s, e in spans]) for a in arrays]


def gathered_events(
    arrays: tuple[Tensor, ...], starts: Tensor, counts: Tensor, total: int | None = None
) -> list[Tensor]:
    """As ``sliced_events``, by one gather per array with no per-sample host work (the GPU
    path). ``total``: ``counts.sum()`` if the caller knows it (else read back from the device,
    a sync)."""
    if total is None:
        total = int(counts.sum())
    # position of each gathered entry in the flat arrays
    shift = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts, output_size=total)
    pos = torch.arange(total, device=starts.device).add_(shift)
    return [a.index_select(0, pos) for a in arrays]


@dataclass(eq=False)
class _Buffer:
    memory: Tensor  # flat, zero except at ``written``
    written: Tensor | None = None  # int64 positions its last batch set


class BatchBuffers:
    """Dense batch tensors whose memory is reused from one batch to the next.

    Building a batch into fresh memory costs a pass that zeroes the whole (T, B, n_in) tensor
    (179 MB at the SHD shape, more than the scatter itself), plus the page faults of a fresh
    allocation. Here a buffer is zeroed instead at the positions its previous batch set: O(events).
    A buffer is reused only once nothing outside holds its memory any more (no batch tensor, view
    or autograd graph still refers to it); while one does, another buffer is used. At most
    ``keep`` buffers are held; a buffer larger than a batch serves it from its start. Not
    thread-safe: build batches from one thread.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.buffers: list[_Buffer] = []  # least recently used first

    def scatter_add(self, numel: int, index: Tensor, values: Tensor) -> Tensor:
        """A flat tensor of ``numel`` zeros with ``values`` added at ``index`` (1-D, int64)."""
        buf = self._free(numel, values.dtype, values.device)
        if buf.written is not None and buf.written.numel():
            if buf.written.numel() * 64 < buf.memory.numel():  # sparse: clear what was set
                buf.memory.index_fill_(0, buf.written, 0)
            else:  # dense enough that one pass over the memory is cheaper
                buf.memory.zero_()
        out = buf.memory[:numel]
        out.scatter_add_(0, index, values)
        buf.written = index
        return out

    def _free(self, numel: int, dtype: torch.dtype, device: torch.device) -> _Buffer:
        """A buffer nothing else refers to, of at least ``numel`` elements; made if none is."""
        free = [b for b in self.buffers if not _referenced(b.memory)]
        for buf in free:
            mem = buf.memory
            if mem.dtype == dtype and mem.device == device and mem.numel() >= numel:
                self.buffers.remove(buf)
                self.buffers.append(buf)
                return buf
        if len(self.buffers) >= self.keep:  # let one go: a free one, else the least recently
            self.buffers.remove(free[0] if free else self.buffers[0])  # used (its holder keeps it)
        buf = _Buffer(torch.zeros(numel, dtype=dtype, device=device))
        self.buffers.append(buf)
        return buf


def _referenced(buf: Tensor) -> bool:
    """Whether anything besides ``buf`` itself holds its memory (a view, a saved tensor, ...).

    Counts the references to the storage: ``buf`` holds one and the probe below one more. If this
    torch cannot count them, every buffer is treated as held (no reuse: always correct).
    """
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return True
    return count(buf.untyped_storage()._cdata) > 2
