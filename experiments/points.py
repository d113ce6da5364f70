"""What the speed benchmarks time on, defined once: the Fig. 3 grids (``GRIDS``, ``D_VALUES``),
the Poisson input of the layer scopes (``poisson_input``), SHD-like data files
(``generate_shd_like``) and the whole-step scope's batches from the real datamodule
(``StepPoint``). Shared by ``bench_speed``, ``bench_data``, ``gpu_check`` and ``kernel_passes``;
not a script.

The whole-step scope, a training step on batches from the real datamodule: for one data shape
(n_in inputs, T steps, a batch size) ``StepPoint`` writes SHD-like files (T steps over 1 s, so
the SHD point is T 500 at 2 ms) and reads them through ``SHDDataModule``, once for all the modes
and hidden sizes timed on them. At each point (a mode, n hidden neurons) it times, in each round,
on one fresh batch per input path (``dense``: scope ``step``; ``sparse``: scope ``step_sparse``;
both paths get the same samples; a path's first batch is built when a runner first asks for it):

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

import numpy as np
import torch
from torch import nn

from datamodules.hdf5 import write_h5
from datamodules.tonic_datasets import SHDDataModule
from dblock.models import SNNClassifier
from dblock.nn import Projection
from experiments.bench_impls import DBLOCK_KERNELS, endless, run_once, train_step

D_VALUES = (5, 10, 15, 20, 25, 30)
# The one definition of the Fig. 3 grids (docs/model.md §7):
# panel -> (mode, [(t_len, n_hidden)], n_in),
# each point timed for every d in D_VALUES at batch 128 (--batch). "full" is the paper's: 3a
# feedforward and 3c recurrent over t = 32..2048 at n = 100; 3b feedforward and 3d recurrent over
# n = 100..1000 at t = 512. Fig. 3 is a benchmark, not a training run: run.py has no fig3
# experiment (`python run.py experiment=fig3a` answers with bench_speed's command).
GRIDS = {
    "full": {
        "a": ("feedforward", [(t, 100) for t in (32, 64, 128, 256, 512, 1024, 2048)], 1000),
        "b": ("feedforward", [(512, n) for n in range(100, 1001, 100)], 1000),
        "c": ("recurrent", [(t, 100) for t in (32, 64, 128, 256, 512, 1024, 2048)], 1000),
        "d": ("recurrent", [(512, n) for n in range(100, 1001, 100)], 1000),
        "shd": (None, [(500, 128)], 700),
    },
    "reduced": {  # a CPU-sized subset: the SHD point, three t of panels a/c, one n of b/d
        "a": ("feedforward", [(t, 100) for t in (128, 512, 2048)], 1000),
        "b": ("feedforward", [(512, 200)], 1000),
        "c": ("recurrent", [(t, 100) for t in (128, 512, 2048)], 1000),
        "d": ("recurrent", [(512, 200)], 1000),
        "shd": (None, [(500, 128)], 700),
    },
    "quick": {
        "a": ("feedforward", [(16, 8), (32, 8)], 20),
        "c": ("recurrent", [(32, 8)], 20),
        "shd": (None, [(20, 6)], 12),
    },
}


def poisson_input(batch: int, n_in: int, t_len: int, device: str, seed: int = 0) -> torch.Tensor:
    """Spikes (T, B, n_in), contiguous: each sample fires at a rate ~ U(0, 200) Hz, 1 ms steps."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rate = torch.rand(1, batch, 1, generator=g) * 200.0
    x = (torch.rand(t_len, batch, n_in, generator=g) < rate * 1e-3).float()
    return x.to(device)


N_IN, N_CLASSES = 700, 20
SHD_EVENTS = 5000.0  # mean events per sample at the SHD size (700 inputs, T 500 at 2 ms)


def generate_shd_like(
    path: Path,
    n: int,
    mean_events: float,
    seed: int,
    n_in: int = N_IN,
    n_classes: int = N_CLASSES,
) -> int:
    """Write ``n`` SHD-like samples to ``path``; returns the number of events written.

    Each sample: a gamma-distributed number of events (mean ``mean_events``) at uniform times over
    0.6-1.3 s (so some fall beyond T at 2 ms bins and are dropped), on units drawn around the
    middle of ``n_in`` channels; a random label of ``n_classes``.
    """
    rng = np.random.default_rng(seed)
    times, units = [], []
    for _ in range(n):
        k = max(1, int(rng.gamma(4.0, mean_events / 4.0)))
        duration = rng.uniform(0.6, 1.3)  # some events beyond 1 s are dropped at T = 500
        times.append(np.sort(rng.uniform(0.0, duration, k)))
        spread = rng.normal(n_in / 2, 150 * n_in / N_IN, k)  # SHD's 700 units: 350 +- 150
        units.append(np.clip(spread, 0, n_in - 1).astype(np.int64))
    write_h5(path, times, units, rng.integers(0, n_classes, n), speakers=rng.integers(0, 10, n))
    return int(sum(len(t) for t in times))


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
