"""The speed benchmark's whole-step scope: a training step on batches from the real datamodule.

For one data shape (n_in inputs, T steps, a batch size) it writes SHD-like files as
``experiments/bench_data.py`` does (T steps over 1 s, so the SHD point is T 500 at 2 ms) and reads
them through ``SHDDataModule``, once for all the modes and hidden sizes timed on them. At each
point (a mode, n hidden neurons) it times, in each round, on one fresh batch per input path
(``dense``: scope ``step``; ``sparse``: scope ``step_sparse``; both paths get the same samples;
a path's first batch is built when a runner first asks for it):

- ``data``: the batch build, ``SHDDataModule.on_after_batch_transfer`` on a batch of sample
  indices, exactly as Lightning hands it over (``dataset.input=dense``: the (T, B, n_in) tensor;
  ``sparse``: the coalesced sparse COO tensor);
- ``floor`` (dense only): ``nn.Linear(n_in, n)`` forward + backward on the dense (contiguous,
  time-major) batch, the reference both paths are reported against;
- ``projection`` (sparse only): the same projection forward + backward on the sparse batch
  (``dblock.functional.event_linear``; its backward sorts the events by unit);
- ``dblock`` (per d; ``dblock_loop`` / ``dblock_chunked`` name the kernel) and ``standard``: one
  hidden layer of n neurons and the readout (``SNNClassifier``), cross-entropy, backward and an
  Adam step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from datamodules.tonic_datasets import SHDDataModule
from dblock.models import SNNClassifier
from dblock.nn import Projection
from experiments.bench_data import N_CLASSES, SHD_EVENTS, generate_shd_like
from experiments.bench_impls import DBLOCK_KERNELS, endless, run_once, train_step

INPUTS = ("dense", "sparse")  # the batch formats (dataset.input), in the order they are timed
SCOPES = {"dense": "step", "sparse": "step_sparse"}  # the benchmark's scope of each


class StepPoint:
    """Batches from ``SHDDataModule`` of one data shape, and the runners timed on them."""

    def __init__(
        self, root: Path, n_in: int, t_len: int, batch: int, rounds: int, device: str
    ) -> None:
        self.n_in, self.t_len, self.device = n_in, t_len, device
        folder = Path(root) / f"step_{n_in}_{t_len}_{batch}"
        files = folder / "SHD"
        n_samples = batch * (rounds + 3)  # a fresh batch every round, warm-up included
        if not (files / "shd_train.h5").is_file():
            events = max(10.0, SHD_EVENTS * n_in * t_len / (700 * 500))
            generate_shd_like(files / "shd_test.h5", 1, events, 1, n_in)
            generate_shd_like(files / "shd_train.h5", n_samples, events, 0, n_in)
        self.dm = SHDDataModule(
            folder,
            n_in=n_in,
            n_classes=N_CLASSES,
            t_len=t_len,
            dt_ms=1000.0 / t_len,
            batch_size=batch,
            val_fraction=0.0,
            cache=False,
            download=False,
        )
        self.dm.setup()
        # one stream of sample indices per input path: the same batches in the same order
        self._indices = {inp: endless(self.dm) for inp in INPUTS}
        self.batches: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def next_batch(self, inp: str) -> None:
        """Build the next ``inp`` batch as Lightning does: indices to the device, then the hook."""
        raw = next(self._indices[inp])
        raw["idx"] = raw["idx"].to(self.device)
        self.batches[inp] = None  # the previous batch is released first, as in a training loop
        self.dm.input = inp
        self.batches[inp] = self.dm.on_after_batch_transfer(raw, 0)

    def runner(self, impl: str, mode: str, n: int, d: int | None, inp: str) -> Callable[[], None]:
        """A zero-argument callable doing one timed unit of ``impl`` (``mode``, ``n`` hidden
        neurons) on the current ``inp`` batch."""
        if inp not in self.batches:  # the path's first batch
            self.next_batch(inp)
        if impl == "data":
            return partial(self.next_batch, inp)
        if impl in ("floor", "projection"):
            # the sparse batch goes through Projection (an nn.Linear that takes sparse input)
            layer = Projection if inp == "sparse" else nn.Linear
            linear = layer(self.n_in, n).to(self.device)
            params = list(linear.parameters())

            def floor() -> None:
                x = self.batches[inp][0]
                assert x.is_coalesced() if x.is_sparse else x.is_contiguous()
                run_once(linear, x, params)

            return floor
        net = SNNClassifier(
            n_in=self.n_in,
            n_hidden=n,
            n_layers=1,
            n_classes=N_CLASSES,
            model="dblock" if impl in DBLOCK_KERNELS else impl,
            d=d or 1,
            recurrent=mode == "recurrent",
            t_len=self.t_len,
            kernel=DBLOCK_KERNELS.get(impl, "auto"),
        ).to(self.device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step() -> None:
            train_step(net, optimizer, *self.batches[inp])

        return step
