"""Memory for dense batches, reused from one batch to the next (``EventStore.dense``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
