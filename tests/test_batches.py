"""Dense batches: memory reused between batches, never while in use, always equal to a fresh
build."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.batches import BatchBuffers
from datamodules.hdf5 import read_h5, write_h5


def _store(tmp_path, n=12, n_in=9, t_len=30):
    times, units = [], []
    rng = np.random.default_rng(4)
    for i in range(n):
        k = 0 if i == 3 else int(rng.integers(1, 60))  # sample 3 is empty
        times.append(np.sort(rng.uniform(0.0, 0.07, k)))  # some beyond T: dropped
        units.append(rng.integers(0, n_in, k))  # repeated (unit, bin) pairs add up
    write_h5(tmp_path / "x.h5", times, units, np.arange(n) % 3)
    return read_h5(tmp_path / "x.h5", n_in=n_in, t_len=t_len, dt_ms=2.0)


def test_sliced_and_gathered_events_agree(tmp_path):
    """The CPU path (one slice per sample) and the device path (one gather) pick the same events."""
    from datamodules.batches import gathered_events, sliced_events

    store = _store(tmp_path)
    idx = torch.tensor([5, 3, 0, 11, 5])
    starts = store.offsets[idx]
    counts = store.offsets[idx + 1] - starts
    arrays = (store.bins, store.units, store.repeats)
    for got, want in zip(
        sliced_events(arrays, starts, counts),
        gathered_events(arrays, starts, counts),
        strict=True,
    ):
        assert torch.equal(got, want) and got.shape[0] == int(counts.sum())


def test_batches_with_their_size_counted_on_the_host_are_the_same(tmp_path, monkeypatch):
    """``entries`` (counted on the host before the transfer) spares the device a read back and
    changes nothing; the dense batch built by the device path (one gather) too."""
    import datamodules.batches as batches

    store = _store(tmp_path)
    idx = torch.tensor([5, 3, 0, 11, 5])
    entries = int((store.offsets[idx + 1] - store.offsets[idx]).sum())
    want_dense, want_sparse = store.dense(idx), store.sparse(idx)
    monkeypatch.setattr(batches, "sliced_events", batches.gathered_events)  # the GPU's path
    for n in (None, entries):
        assert torch.equal(store.dense(idx, entries=n), want_dense)
        got = store.sparse(idx, entries=n)
        assert torch.equal(got.indices(), want_sparse.indices())
        assert torch.equal(got.values(), want_sparse.values())


def test_batch_buffers_reuse_memory_and_match_fresh_batches(tmp_path):
    store = _store(tmp_path)
    buffers = BatchBuffers()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for size in (5, 5, 3, 5, 1, 5, 5):  # smaller batches are served from a larger buffer
        idx = torch.randint(0, len(store), (size,), generator=g)
        x = store.dense(idx, buffers=buffers)
        assert x.shape == (30, size, 9) and x.is_contiguous()
        assert torch.equal(x, store.dense(idx))  # every position set or cleared correctly
        seen.add(x.data_ptr())
        del x  # released: the next batch may reuse its memory
    assert len(seen) == 1 and len(buffers.buffers) == 1  # one buffer served every batch


def test_batch_buffers_never_overwrite_a_batch_still_in_use(tmp_path):
    store = _store(tmp_path)
    buffers = BatchBuffers()
    a_idx, b_idx = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])
    want_a, want_b = store.dense(a_idx), store.dense(b_idx)
    a = store.dense(a_idx, buffers=buffers)
    view, ptr_a = a[1:], a.data_ptr()  # a view keeps the memory in use
    del a
    b = store.dense(b_idx, buffers=buffers)
    ptr_b = b.data_ptr()
    assert ptr_b != ptr_a and torch.equal(view, want_a[1:])
    del b
    c = store.dense(b_idx, buffers=buffers)
    assert c.data_ptr() == ptr_b and torch.equal(c, want_b)  # b's memory, free again, reused
    assert torch.equal(view, want_a[1:])
    del c, view
    # a batch that autograd saved for the backward pass is in use until the graph is freed
    w = torch.ones(9, requires_grad=True)
    x = store.dense(a_idx, buffers=buffers)
    loss = (x * w).sum()
    ptr_x = x.data_ptr()
    del x
    y = store.dense(b_idx, buffers=buffers)
    assert y.data_ptr() != ptr_x and torch.equal(y, want_b)
    loss.backward()  # reads the saved batch: it must still hold batch a
    torch.testing.assert_close(w.grad, want_a.sum((0, 1)))
    del loss, y
    assert store.dense(b_idx, buffers=buffers).data_ptr() in (ptr_a, ptr_b)
    assert len(buffers.buffers) <= buffers.keep
