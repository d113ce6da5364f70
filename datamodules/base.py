"""A LightningDataModule over the event store: batches are built on the training device.

DataLoaders yield only sample indices (cheap, no worker processes, DDP-shardable by Lightning's
distributed sampler); ``on_after_batch_transfer`` turns them into time-major (T, B, n_in) counts
from the store held on the model's device: a sparse COO tensor of the batch's events (``input``
``sparse``; the model's input projection then costs in proportion to the events), or a dense
tensor built by scatter-add into memory reused from an earlier batch once nothing refers to that
batch any more (``dense``). ``auto``: sparse on the CPU, dense on other devices.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.batches import BatchBuffers, check_input_format
from datamodules.cache import cached_store
from datamodules.checks import DataError, check_dropped
from datamodules.store import EventStore
from dblock.values import boolean, is_number, positive_int

log = logging.getLogger(__name__)


class IndexDataset(Dataset):
    """Indices into one store; a batch of them is collated to ``{"store": name, "idx": (B,)}``."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int:
        return int(self.indices[i])


class ShardSampler(Sampler[int]):
    """Positions ``0..n-1`` for one process: seeded per epoch, resumable, DDP-sharded.

    ``shuffle``: a permutation drawn from ``seed + epoch`` (Lightning calls ``set_epoch`` each
    epoch, also after a resume), so the order of epoch k never depends on what ran before.
    Shards are ``order[rank::world_size]``. ``pad``: repeat the first items so every process gets
    the same count (training needs equal step counts); without it each sample is seen exactly
    once over all processes (evaluation).
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        order = self._order()
        if self.pad and self.n and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * (extra // self.n + 1))[:extra]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        total = -(-self.n // self.world_size) * self.world_size if self.pad else self.n
        return len(range(self.rank, total, self.world_size))


def collate_indices(items: list[int], store: str) -> dict:
    return {"store": store, "idx": torch.tensor(items, dtype=torch.long)}


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of each class (seeded; at least one sample of every class with two
    or more when ``fraction > 0``); returns (train_idx, val_idx)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        k = int(round(fraction * len(members)))
        if fraction > 0 and len(members) > 1:
            k = min(max(k, 1), len(members) - 1)  # a requested split is never silently empty
        val.append(members[:k])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class EventDataModule(pl.LightningDataModule):
    """Base for every dataset: subclasses implement ``load_split(name) -> EventStore``.

    Splits: ``train`` and ``test`` come from the store of the same name; ``val`` is either a
    ``valid`` store (``has_valid_file``) or a seeded, stratified ``val_fraction`` of train.
    ``val_fraction=0`` means no validation split at all (no val loader), for the protocol that
    keeps the checkpoint with the lowest training loss. Binned stores are cached on disk under
    ``cache_dir`` (default ``<data_dir>/cache``; ``cache=False`` turns the cache off).

    Every split read must hold samples, and at most ``max_dropped_fraction`` of its events may
    fall at or beyond T (more means a unit mistake or a too short T; 1 allows any).

    ``input``: the batch format, ``sparse`` (a coalesced sparse COO tensor of counts), ``dense``
    or ``auto`` (sparse on the CPU, where it makes the input projection many times cheaper;
    dense on a GPU, whose dense matmul is fast).

    Args:
        data_dir: the data root (``paths.data_dir``); each dataset reads its folder under it.
        n_in: input channels; an event's unit must be in ``[0, n_in)``.
        n_classes: classes; a label must be in ``[0, n_classes)``.
        t_len: T, time steps per sample; events binned at or beyond T are dropped (counted).
        dt_ms: the bin width in ms: an event at time t goes to bin ``round(t / dt)``.
        batch_size: samples per batch (>= 1).
        val_fraction: held-out fraction of train, in [0, 1) (0: no validation split).
        split_seed: seed of the stratified validation hold-out.
        cache: keep the binned stores on disk (one ``.npz`` per split).
        cache_dir: where; None: ``<data_dir>/cache``.
        max_dropped_fraction: the most of a split's events that may fall beyond T, in [0, 1].
        input: ``sparse`` | ``dense`` | ``auto`` (above).

    Batches (``on_after_batch_transfer``): ``(x, y)``, ``x`` time-major (T, B, n_in) counts,
    ``y`` (B,) int64 labels.
    """

    name = "events"
    has_valid_file = False
    generated = False  # True: prepare_data writes the files, data_dir need only be writable

    def __init__(
        self,
        data_dir: str | Path,
        n_in: int,
        n_classes: int,
        t_len: int,
        dt_ms: float,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        max_dropped_fraction: float = 0.5,
        input: str = "auto",
    ) -> None:
        super().__init__()
        check_input_format(input)
        self.input = input
        positive_int("dataset.batch_size", batch_size)
        boolean("dataset.cache", cache)
        fraction = max_dropped_fraction
        if not is_number(fraction) or not 0 <= fraction <= 1:
            raise ValueError(
                "dataset.max_dropped_fraction must be a number in [0, 1], got "
                f"{max_dropped_fraction!r}"
            )
        self.max_dropped_fraction = float(max_dropped_fraction)
        self.data_dir = Path(data_dir)
        self.n_in, self.n_classes, self.t_len, self.dt_ms = n_in, n_classes, t_len, dt_ms
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed
        if not cache:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir is not None else self.data_dir / "cache"
        self.stores: dict[str, EventStore] = {}
        self.split_indices: dict[str, tuple[str, np.ndarray]] = {}
        self._on_device: dict[tuple[str, str], EventStore] = {}
        self._buffers = BatchBuffers()  # batch memory reused once the step is done with it

    def writes_data_dir(self) -> bool:
        """Whether preparing the data writes files into ``data_dir`` (generated data; files to
        download); otherwise a read-only ``data_dir`` will do (the cache then only warns)."""
        return self.generated

    @property
    def has_val(self) -> bool:
        """Whether there is a validation split: ``val_fraction > 0`` (valid file or hold-out)."""
        return self.val_fraction > 0

    def load_split(self, split: str) -> EventStore:  # pragma: no cover - abstract
        raise NotImplementedError

    def source(self, split: str) -> str:
        """The file (or folder) ``split`` is read from, as error messages name it."""
        return f"{self.name} {split}"

    def empty_fix(self, split: str) -> str:
        """How to fix an empty ``split``."""
        return "The file is empty or cut short: delete it and fetch it again."

    def time_hint(self, split: str) -> str:
        """Why most events of ``split`` may fall beyond T (called only when they do)."""
        return "the times may be in another unit than expected, or T too short. Check the unit"

    def check_store(self, split: str, store: EventStore) -> None:
        """Refuse an empty split, or one where most events fall beyond T (``DataError``)."""
        if len(store) == 0:
            use = "train on" if split == "train" else "evaluate"
            raise DataError(
                f"{self.source(split)}: the {split} split has 0 samples, nothing to {use}. "
                f"{self.empty_fix(split)}"
            )
        if store.dropped is None or store.raw_counts is None:
            return
        check_dropped(
            self.source(split),
            int(store.raw_counts.sum()),
            int(store.dropped.sum()),
            self.max_dropped_fraction,
            self.t_len,
            self.dt_ms,
            hint=lambda: self.time_hint(split),
        )

    def load_cached(self, split: str, sources: list[Path], build) -> EventStore:
        """``build()`` the store of ``split`` from ``sources``, through the on-disk cache."""
        return cached_store(
            None if self.cache_dir is None else self.cache_dir / self.name,
            f"{self.name}_{split}",
            sources,
            build,
            dt_ms=float(self.dt_ms),
            t_len=int(self.t_len),
            n_in=int(self.n_in),
            n_classes=int(self.n_classes),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.split_indices:
            return
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        use_valid = self.has_valid_file and self.val_fraction > 0
        for split in ("train", "test") + (("valid",) if use_valid else ()):
            self.stores[split] = self.load_split(split)
            self.check_store(split, self.stores[split])
            _ = self.stores[split].single  # read on the host, carried to the device copies
        train = self.stores["train"]
        if use_valid:
            train_idx, val = np.arange(len(train)), ("valid", np.arange(len(self.stores["valid"])))
        else:
            train_idx, val_idx = stratified_split(
                train.labels.numpy(), self.val_fraction, self.split_seed
            )
            val = ("train", val_idx)
        self.split_indices = {
            "train": ("train", train_idx),
            "val": val,
            "test": ("test", np.arange(len(self.stores["test"]))),
        }
        for split, (store, idx) in self.split_indices.items():
            if split == "val" and len(idx) == 0:
                log.info("%s val: none (val_fraction=0)", self.name)
                continue
            log.info("%s %s: %s", self.name, split, self.describe(store, idx))

    def describe(self, store: str, idx: np.ndarray) -> str:
        """Samples, events, events dropped beyond T, empty samples and classes of a split."""
        s = self.stores[store]
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        events = int(s.sample_events(idx_t).sum())
        dropped = int(s.dropped[idx_t].sum()) if s.dropped is not None else 0
        empty = int((s.raw_counts[idx_t] == 0).sum()) if s.raw_counts is not None else 0
        classes = len(torch.unique(s.labels[idx_t]))
        return (
            f"{len(idx)} samples ({empty} empty), {events} events, {dropped} dropped beyond "
            f"T={s.t_len}, {classes} classes (store {store!r})"
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        store, idx = self.split_indices[split]
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # the seed Lightning's own samplers use (set by seed_everything); train pads shards to
        # equal length, val/test see every sample exactly once over all processes
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ShardSampler(len(idx), shuffle, seed, rank, world, pad=split == "train")
        return DataLoader(
            IndexDataset(idx),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(collate_indices, store=store),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.split_indices["val"][1]) == 0:
            warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero")
            return []  # val_fraction = 0: no validation split
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def store_on(self, name: str, device: torch.device) -> EventStore:
        """The store ``name`` on ``device``, moved there once and kept."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = self.stores[name].to(device)
        return self._on_device[key]

    def sparse_on(self, device: torch.device) -> bool:
        """Whether batches on ``device`` are sparse (``input``; ``auto``: on the CPU)."""
        return self.input == "sparse" or (self.input == "auto" and device.type == "cpu")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Adds ``entries``, the batch's (bin, unit) entries, counted here on the host from the
        store's offsets: the batch is built on the device with no read back of its size."""
        offsets = self.stores[batch["store"]].offsets
        idx = batch["idx"]
        return {**batch, "entries": int((offsets[idx + 1] - offsets[idx]).sum())}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        idx, entries = batch["idx"], batch.get("entries")
        store = self.store_on(batch["store"], idx.device)
        if self.sparse_on(idx.device):
            return store.sparse(idx, entries=entries), store.labels[idx]
        return store.dense(idx, buffers=self._buffers, entries=entries), store.labels[idx]
