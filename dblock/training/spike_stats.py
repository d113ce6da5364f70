"""Per-layer spike statistics for the dashboard: firing rate, silent neurons, spike rasters.

``SpikeStats`` is a Lightning callback. It hooks the output of every hidden layer
(``pl_module.model.hidden``) and, per stage (train, val, test) and epoch, logs to every logger

- ``<stage>/layer<i>/firing_rate``: mean spikes per neuron per time step, over the epoch's
  samples (total spikes / (n_neurons * T * samples)), in [0, 1];
- ``<stage>/layer<i>/silent_frac``: the fraction of the layer's neurons that never fired in the
  epoch, in [0, 1];

``i`` counts hidden layers from 1. The counts stay on the model's device: each forward adds one
(n_neurons,) reduction per layer in place, without any host sync; they are read once per epoch
(under DDP each process counts its shard and the logged values are their mean). With
``raster_samples=k > 0`` the first k samples of the first validation batch are kept and drawn at
the end of validation as one image (rows: layers; columns: samples; time across, neurons up),
written atomically to ``<dirpath>/val_epoch<E>.png`` (``E`` as in metrics.csv's ``epoch``
column) and logged as the image ``val/raster`` to every wandb logger.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from dblock.files import atomic_path

log = logging.getLogger(__name__)


class SpikeCounter:
    """Spike counts of one layer over an epoch: per neuron, and the time steps x samples seen.

    ``add(spikes)`` takes (T, B, N) spikes and adds their per-neuron sum in place (on the
    spikes' device, no host sync). ``stats()`` returns (firing_rate, silent_frac), 0-d tensors.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # (N,) float32
        self.steps = 0  # T * B summed over the epoch (a host integer: shapes need no sync)

    def reset(self) -> None:
        if self.counts is not None:
            self.counts.zero_()
        self.steps = 0

    def add(self, spikes: Tensor) -> None:
        s = spikes.detach()
        per_neuron = s.sum(dim=(0, 1), dtype=torch.float32)  # float32: half counts round > 2048
        if self.counts is None or self.counts.shape != per_neuron.shape:
            self.counts = torch.zeros_like(per_neuron)
        if self.counts.device != per_neuron.device:
            self.counts = self.counts.to(per_neuron.device)
        self.counts.add_(per_neuron)
        self.steps += s.shape[0] * s.shape[1]

    def stats(self, reduce=None) -> tuple[Tensor, Tensor] | None:
        """(firing_rate, silent_frac) of the counts so far; ``reduce`` sums a tensor over
        processes (``trainer.strategy.reduce``). None when nothing was counted."""
        if self.counts is None or self.steps == 0:
            return None
        counts = self.counts
        steps = torch.tensor(float(self.steps), device=counts.device)
        if reduce is not None:
            counts, steps = reduce(counts.clone()), reduce(steps)
        rate = counts.sum() / (counts.numel() * steps)
        silent = (counts == 0).float().mean()
        return rate, silent


class SpikeStats(pl.Callback):
    """Logs each hidden layer's firing rate and silent fraction per stage and epoch; optionally
    draws a spike raster of ``raster_samples`` validation samples per layer into ``dirpath``."""

    STAGES = ("train", "val", "test")

    def __init__(self, raster_samples: int = 0, dirpath: str | None = None) -> None:
        if isinstance(raster_samples, bool) or not isinstance(raster_samples, int):
            raise ValueError(
                f"callbacks.spike_stats.raster_samples must be an integer >= 0 (0: no raster), "
                f"got {raster_samples!r}"
            )
        if raster_samples < 0:
            raise ValueError(
                f"callbacks.spike_stats.raster_samples must be >= 0 (0: no raster), got "
                f"{raster_samples}"
            )
        if raster_samples and dirpath is None:
            raise ValueError("callbacks.spike_stats.dirpath is needed with raster_samples > 0")
        self.raster_samples = raster_samples
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.counters: dict[str, list[SpikeCounter]] = {}
        self.stage: str | None = None
        self._outer: str | None = None  # the stage validation interrupts (train)
        self.raster: list[Tensor | None] = []
        self._handles: list = []

    # -- hooks on the hidden layers -------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handles:
            return
        hidden = getattr(getattr(pl_module, "model", None), "hidden", None)
        if hidden is None:
            log.warning("spike_stats: the model has no hidden layers to watch (model.hidden)")
            return
        self.counters = {s: [SpikeCounter() for _ in hidden] for s in self.STAGES}
        self.raster = [None] * len(hidden)
        for i, layer in enumerate(hidden):
            self._handles.append(layer.register_forward_hook(self._hook(i)))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, i: int):
        def record(module, inputs, spikes: Tensor) -> None:
            if self.stage is None:
                return
            self.counters[self.stage][i].add(spikes)
            if self.stage == "val" and self.raster_samples and self.raster[i] is None:
                self.raster[i] = spikes.detach()[:, : self.raster_samples].clone()

        return record

    # -- stages ---------------------------------------------------------------------------
    def _start(self, stage: str) -> None:
        for counter in self.counters.get(stage, []):
            counter.reset()
        self.stage = stage

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for i, counter in enumerate(self.counters.get(stage, []), start=1):
            # under DDP Lightning averages each value over the processes (sync_dist): every
            # process logs the same keys here, since each gets the same number of batches
            stats = counter.stats()
            if stats is None:
                continue
            rate, silent = stats
            pl_module.log(f"{stage}/layer{i}/firing_rate", rate, on_epoch=True, sync_dist=True)
            pl_module.log(f"{stage}/layer{i}/silent_frac", silent, on_epoch=True, sync_dist=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start("train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "train")
        self.stage = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._outer = self.stage
        self.raster = [None] * len(self.raster)
        self._start("val")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")
            if (
                self.raster_samples
                and trainer.is_global_zero
                and any(r is not None for r in self.raster)
            ):
                self._write_raster(trainer)
        self.stage = self._outer

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start("test")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test")
        self.stage = None

    # -- raster ---------------------------------------------------------------------------
    def _write_raster(self, trainer: pl.Trainer) -> Path:
        path = self.dirpath / f"val_epoch{trainer.current_epoch:03d}.png"
        rasters = [r.float().cpu() if r is not None else None for r in self.raster]
        draw_raster(rasters, path, title=f"validation spikes, epoch {trainer.current_epoch}")
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.log_image("val/raster", [str(path)], step=trainer.global_step)
        return path


def draw_raster(rasters: list[Tensor | None], path: Path, title: str = "") -> None:
    """One PNG, atomically: a row per layer, a column per sample; each (T, B, N) raster is
    drawn as time (x) against neuron (y), a dot per spike."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    samples = max(r.shape[1] for r in rasters if r is not None)
    fig, axes = plt.subplots(
        len(rasters), samples, figsize=(2.4 * samples, 1.8 * len(rasters)), squeeze=False
    )
    for i, r in enumerate(rasters):
        for j in range(samples):
            ax = axes[i][j]
            if r is not None and j < r.shape[1]:
                t, n = torch.nonzero(r[:, j] > 0, as_tuple=True)
                ax.scatter(t.numpy(), n.numpy(), s=6, c="k", marker="|", linewidths=0.8)
                ax.set_xlim(0, r.shape[0])
                ax.set_ylim(-0.5, r.shape[2] - 0.5)
            ax.set_title(f"layer {i + 1}, sample {j}", fontsize=7)
            ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("time step", fontsize=7)
    for row in axes:
        row[0].set_ylabel("neuron", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
