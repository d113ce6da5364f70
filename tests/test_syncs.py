"""No host sync in a training step: a real ``run.py`` fit, every dispatched op watched by
``tests.syncs.SyncCounter`` (a ``TorchDispatchMode``), counted per phase of each step.

On a GPU each counted op (``.item()``/``bool()``/``int()``, an op whose output size depends on
the data, a tensor made from Python data) makes the host wait for the device, so the device
idles between steps. Tensors made on the host (no device named) are listed too: a GPU step
copies them to the device. The batches are built with the GPU's code path (the counter's
``device_batches``), so the CPU run covers what a GPU runs.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.faults import TINY, run_cli
from tests.syncs import syncs

STEP_PHASES = ("train_batch", "train_step", "val_batch", "val_step")


def counted(tmp_path, *args) -> dict:
    out = tmp_path / "syncs.json"
    run = [*TINY, "trainer.max_epochs=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    run_cli([*run, *args, *syncs(out)], tmp_path)
    data = json.loads(out.read_text())
    assert data["steps"] == 8 and data["val_steps"] == 2  # 2 epochs of 4 batches and 1 val batch
    return data


def in_steps(data: dict, kind: str) -> Counter:
    return Counter(
        f"{h['phase']}: {h['op']} @ {h['where']}"
        for h in data["hits"]
        if h["kind"] == kind and h["phase"] in STEP_PHASES
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dblock", "standard"])
def test_a_dense_training_step_never_waits_for_the_device(model, tmp_path):
    data = counted(tmp_path, f"model={model}", "dataset.input=dense")
    assert in_steps(data, "sync") == Counter(), "host syncs in the steps"
    assert in_steps(data, "host_data") == Counter(), "Python data copied to the device"
    # tensors made on the host in a step, which a GPU step copies to the device: none
    assert in_steps(data, "host_made") == Counter(), "host tensors copied to the device"
    # the counter sees what it must: the metrics are read at each epoch's end
    assert any(h["kind"] == "sync" and h["phase"] == "other" for h in data["hits"])


@pytest.mark.slow
def test_a_sparse_training_step_syncs_only_on_its_first_batch(tmp_path):
    """The sparse path: the batch is built with its size known on the host, and the event
    projection counts events by ``scatter_add`` (CUDA's ``bincount`` would read the maximum of
    its input back): no sync after the first step. The store's per-bin counts are computed once,
    on the first batch of each store (step 1)."""
    data = counted(tmp_path, "dataset.input=sparse")
    train = ("train_batch", "train_step")
    later = [h for h in data["hits"] if h["step"] > 1 and h["phase"] in train]
    syncs_later = [h for h in later if h["kind"] == "sync"]
    assert syncs_later == []
    assert not [h for h in later if h["kind"] == "host_data"]
