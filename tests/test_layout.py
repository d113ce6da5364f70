"""Time-major end to end: a training step never copies a whole tensor into another layout."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from datamodules.bursts import BurstsDataModule
from dblock.models import SNNClassifier
from dblock.training.spike_stats import SpikeStats
from dblock.training.task import SNNTask

COPIES = {
    torch.ops.aten.copy_.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
}


def _layout(t: torch.Tensor) -> tuple | None:
    """Strides of the dimensions that matter (size > 1); None for broadcast (stride-0) views and
    for sparse tensors (no strides: a copy of one is no transposition)."""
    if t.layout != torch.strided:
        return None
    strides = [s for n, s in zip(t.shape, t.stride(), strict=True) if n > 1]
    return None if 0 in strides else tuple(strides)


class LayoutCopies(TorchDispatchMode):
    """Records every copy of at least ``threshold`` elements whose source layout differs from
    the destination's: a transposing copy (a permuted view made contiguous)."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold, self.found, self.ops = threshold, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func in COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            big = src.numel() >= self.threshold
            if big and _layout(src) is not None and _layout(src) != _layout(dst):
                self.found.append(f"{func}: {tuple(src.shape)} strides {src.stride()}")
        return out


class Watch(pl.Callback):
    """Runs each training step (forward, loss, backward, Adam) inside ``LayoutCopies``."""

    def __init__(self, mode: LayoutCopies) -> None:
        self.mode = mode
        self.inputs: set = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, _ = batch
        assert x.shape[1] == batch[1].shape[0]  # (T, B, n_in)
        if x.layout == torch.sparse_coo:  # events in (t, b, unit) order, as the projection reads
            assert x.is_coalesced()
        else:
            assert x.is_contiguous()
        self.inputs.add(x.layout)
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize(
    "model, recurrent, detach, batch_input",
    [
        ("dblock", True, True, "sparse"),
        ("dblock", True, True, "dense"),
        ("dblock", False, True, "sparse"),
        ("dblock", True, False, "dense"),
        ("standard", True, True, "sparse"),
        ("standard", False, True, "dense"),
    ],
)
def test_training_step_makes_no_transposing_copy(tmp_path, model, recurrent, detach, batch_input):
    n_hidden = 24  # != n_in (64) and != T (100): each layout's size is distinct
    dm = BurstsDataModule(
        tmp_path, n_train=64, n_test=16, batch_size=16, val_fraction=0.0, input=batch_input
    )
    net = SNNClassifier(
        n_in=64,
        n_hidden=n_hidden,
        n_layers=2,
        n_classes=10,
        model=model,
        d=10,
        recurrent=recurrent,
        detach_recurrent=detach,
        t_len=100,
    )
    mode = LayoutCopies(threshold=100 * 16 * n_hidden)  # a whole (T, B, N) tensor or more
    watch = Watch(mode)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch, SpikeStats()],  # the per-layer statistics' hooks run in the step too
    )
    trainer.fit(SNNTask(net, n_classes=10), datamodule=dm)
    assert mode.ops > 50  # the steps ran inside the watch
    assert mode.found == []
    assert watch.inputs == {torch.sparse_coo if batch_input == "sparse" else torch.strided}


def test_the_watch_sees_a_transposing_copy():
    """The check itself can fail: a permuted (B, N, T) view made contiguous is caught."""
    x = torch.randn(100, 16, 24, requires_grad=True)
    with LayoutCopies(threshold=100 * 16 * 24) as mode:
        x.permute(1, 2, 0).contiguous().sum().backward()
    assert len(mode.found) == 1
    with LayoutCopies(threshold=100 * 16 * 24) as mode:
        (torch.zeros(100, 16, 24) + torch.ones(24)).sum()  # a broadcast is not a layout change
        x.clone()
    assert mode.found == []
