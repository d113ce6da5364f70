"""Per-layer firing rates, silent fractions and spike rasters on the dashboard (SpikeStats)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from dblock.training.spike_stats import SpikeCounter, SpikeStats
from tests.faults import TINY, run_cli

LAYER_KEYS = ("firing_rate", "silent_frac")
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose"}


def test_counter_rate_and_silent_fraction():
    g = torch.Generator().manual_seed(0)
    counter = SpikeCounter()
    a = (torch.rand(7, 3, 5, generator=g) < 0.3).float()
    a[:, :, 4] = 0  # neuron 4 never fires
    b = (torch.rand(7, 2, 5, generator=g) < 0.3).float()
    b[:, :, 4] = 0
    b[:, :, 2] = 0  # neuron 2 fires only in the first batch
    a[:, :, 2] = 0
    a[3, 1, 2] = 1
    counter.add(a)
    counter.add(b)
    rate, silent = counter.stats()
    both = torch.cat([a, b], dim=1)
    assert rate.item() == pytest.approx(both.mean().item())
    assert silent.item() == pytest.approx(1 / 5)
    counter.reset()
    assert counter.stats() is None
    counter.add(torch.zeros(4, 2, 5))
    rate, silent = counter.stats()
    assert rate.item() == 0.0 and silent.item() == 1.0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_raster_samples_refused(bad):
    with pytest.raises(ValueError, match="raster_samples"):
        SpikeStats(raster_samples=bad, dirpath="x")


def read_metrics(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def independent_test_stats(run: Path) -> list[tuple[float, float]]:
    """(firing_rate, silent_frac) per hidden layer of the tested checkpoint over the test split,
    from the layers' spikes, computed here without the callback."""
    from hydra.utils import instantiate

    from dblock.models import SNNClassifier

    cfg = OmegaConf.load(run / "config.yaml")
    results = json.loads((run / "results.json").read_text())
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup("test")
    model = instantiate(cfg.model)
    assert isinstance(model, SNNClassifier)
    state = torch.load(results["tested_ckpt"], weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    counts = [torch.zeros(cfg.n_hidden) for _ in model.hidden]
    steps = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            x, _ = dm.on_after_batch_transfer(batch, 0)
            for i, layer in enumerate(model.hidden):
                x = layer(x)
                counts[i] += x.sum(dim=(0, 1))
            steps += x.shape[0] * x.shape[1]
    return [(float(c.sum() / (c.numel() * steps)), float((c == 0).float().mean())) for c in counts]


@pytest.mark.slow
def test_layer_stats_in_metrics_csv_and_raster_png(tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            *TINY,
            "layers=2",
            "trainer.max_epochs=2",
            "test_ckpt=last",
            f"hydra.run.dir={run}",
            "callbacks.spike_stats.raster_samples=2",
        ],
        tmp_path,
    )
    rows = read_metrics(run / "csv" / "metrics.csv")
    for stage in ("train", "val"):
        stage_rows = [r for r in rows if r[f"{stage}/loss"]]
        assert [int(r["epoch"]) for r in stage_rows] == [0, 1]  # one row per epoch
        for r in stage_rows:
            for layer in (1, 2):
                for key in LAYER_KEYS:
                    assert 0.0 <= float(r[f"{stage}/layer{layer}/{key}"]) <= 1.0
            # the total spike count the task logs is the per-layer rates times neurons x T
            per_sample = sum(float(r[f"{stage}/layer{i}/firing_rate"]) for i in (1, 2)) * 16 * 100
            assert per_sample == pytest.approx(float(r[f"{stage}/spikes_per_sample"]), rel=1e-4)
    (test,) = [r for r in rows if r["test/loss"]]
    want = independent_test_stats(run)
    for i, (rate, silent) in enumerate(want, start=1):
        assert float(test[f"test/layer{i}/firing_rate"]) == pytest.approx(rate, rel=1e-5, abs=1e-9)
        assert float(test[f"test/layer{i}/silent_frac"]) == pytest.approx(silent, abs=1e-9)
    # at the paper's initialisation the second layer does not fire on this sparse input yet:
    # the silent fraction says so (1.0, rate 0), as the independent count does
    assert want[1] == (0.0, 1.0) and float(test["test/layer2/silent_frac"]) == 1.0
    pngs = sorted(p.name for p in (run / "rasters").iterdir())
    assert pngs == ["val_epoch000.png", "val_epoch001.png"]  # nothing else: no temp file left
    assert (run / "rasters" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_layer_stats_and_raster_reach_wandb_offline(tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            *TINY,
            "trainer.max_epochs=1",
            "logger=wandb",
            f"hydra.run.dir={run}",
            "callbacks.spike_stats.raster_samples=1",
        ],
        tmp_path,
    )
    (offline,) = (run / "wandb").glob("offline-run-*")
    data = next(offline.glob("*.wandb")).read_bytes()  # the run's records (values: csv test)
    for stage in ("train", "val", "test"):
        for key in LAYER_KEYS:
            assert f"{stage}/layer1/{key}".encode() in data, (stage, key)
    assert b"val/raster" in data
    media = list((offline / "files" / "media" / "images" / "val").glob("raster_*.png"))
    assert len(media) == 1 and media[0].read_bytes()[:4] == b"\x89PNG"
    assert (run / "rasters" / "val_epoch000.png").is_file()
    assert not (run / "csv").exists()  # wandb only: the PNG is the run folder's copy


def test_bad_raster_samples_is_one_error_line(tmp_path):
    proc = run_cli(
        [*TINY, f"hydra.run.dir={tmp_path / 'run'}", "callbacks.spike_stats.raster_samples=-2"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "error: callbacks.spike_stats.raster_samples must be >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


class Ops(TorchDispatchMode):
    """Records the name of every ATen op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_counting_makes_no_host_sync():
    """A step's hook only adds on the device: no op that reads a value back to the host
    (``.item()``, ``bool(t)``, ``nonzero``), so a training step stays free of host syncs."""
    stats = SpikeStats()
    stats.counters = {"train": [SpikeCounter()]}
    stats.raster = [None]
    stats.stage = "train"
    hook = stats._hook(0)
    spikes = (torch.rand(6, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    hook(None, None, spikes)  # the first call allocates the counts
    with Ops() as ops:
        hook(None, None, spikes)
        hook(None, None, spikes)
    assert ops.names and not [n for n in ops.names if n.split(".")[0] in HOST_READS], ops.names
    assert stats.counters["train"][0].counts.tolist() == (3 * spikes.sum((0, 1))).tolist()
