"""The event store and the SHD-layout reader: binning checked by hand."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from datamodules.base import stratified_split
from datamodules.bursts import BurstsDataModule, generate
from datamodules.hdf5 import read_h5, write_h5


def test_dense_matches_hand_binning(tmp_path):
    times = [np.array([0.0, 0.0011, 0.0019, 0.0019, 0.0095, 0.5]), np.array([0.003]), np.array([])]
    units = [np.array([0, 1, 1, 1, 2, 0]), np.array([2]), np.array([], dtype=np.int64)]
    write_h5(tmp_path / "x.h5", times, units, np.array([1, 0, 2]))
    store = read_h5(tmp_path / "x.h5", n_in=3, t_len=5, dt_ms=2.0)
    dense = store.dense(torch.tensor([0, 1, 2]))
    want = torch.zeros(5, 3, 3)  # time-major: (bin, sample, unit)
    want[0, 0, 0] += 1  # 0.0 s -> bin 0
    want[1, 0, 1] += 1  # 1.1 ms / 2 -> round(0.55) = 1
    want[1, 0, 1] += 2  # 1.9 ms twice -> round(0.95) = 1, repeated (unit, bin) adds up
    # 9.5 ms -> round(4.75) = 5 >= T: dropped; 0.5 s: dropped
    want[2, 1, 2] += 1  # 3 ms -> round(1.5) = 2 (float16 storage: 0.003 -> 0.0030002)
    torch.testing.assert_close(dense, want)
    assert dense.is_contiguous()
    assert store.labels.tolist() == [1, 0, 2]
    assert store.dense(torch.tensor([1, 0]))[:, 1].equal(want[:, 0])


def test_h5_layout_is_shd(tmp_path):
    times, units, labels = generate(4, seed=0)
    write_h5(tmp_path / "x.h5", times, units, labels)
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["spikes/times"].dtype.metadata["vlen"] == np.float16
        assert f["spikes/units"].dtype.metadata["vlen"] == np.uint16
        assert set(f["extra"].keys()) == {"keys", "speaker"}
        assert f["labels"].shape == (4,)


def test_bursts_is_deterministic(tmp_path):
    a = generate(16, seed=3)
    b = generate(16, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert np.array_equal(a[2], b[2])


def test_bursts_classes_share_channel_counts():
    """The two classes of a pair fire the same channels: order is the only cue."""
    times, units, labels = generate(2000, seed=0)
    counts = np.stack([np.bincount(u, minlength=64) for u in units]).astype(float)
    a, b = counts[labels == 0].mean(0), counts[labels == 1].mean(0)
    assert np.abs(a - b).max() < 0.5
    first = [
        np.median(t[u < 8]) < np.median(t[(u >= 8) & (u < 16)])
        for t, u, y in zip(times, units, labels, strict=True)
        if y == 0
    ]
    assert np.mean(first) > 0.95


def test_datamodule_batches(tmp_path):
    dm = BurstsDataModule(tmp_path, n_train=64, n_test=32, batch_size=16, input="dense")
    dm.prepare_data()
    dm.setup()
    assert len(dm.split_indices["train"][1]) + len(dm.split_indices["val"][1]) == 64
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer(dict(batch), 0)
    assert x.shape == (100, 16, 64) and y.shape == (16,) and x.is_contiguous()
    assert x.sum() > 0 and 0 <= y.min() and y.max() < 10
    dm.input = "auto"  # on the CPU: the same counts as a coalesced sparse tensor
    xs, ys = dm.on_after_batch_transfer(batch, 0)
    assert xs.layout == torch.sparse_coo and xs.is_coalesced() and torch.equal(ys, y)
    assert torch.equal(xs.to_dense(), x)


def test_stratified_split():
    labels = np.repeat(np.arange(4), 25)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(val) == 20 and np.bincount(labels[val]).tolist() == [5] * 4
    assert not set(train) & set(val)
    assert np.array_equal(val, stratified_split(labels, 0.2, seed=0)[1])

