"""Mixed precision: half-precision currents are integrated in float32; bf16-mixed trains."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch

from datamodules.bursts import BurstsDataModule
from dblock import functional as F
from dblock.models import SNNClassifier
from dblock.training.task import SNNTask


def _inputs(t=60, b=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    current = (torch.randn(t, b, n, generator=g) * 0.7 + 0.4).bfloat16()
    beta = torch.rand(n, generator=g) * 0.3 + 0.7
    weight = torch.randn(n, n, generator=g) * 0.5
    bias = torch.randn(n, generator=g) * 0.1
    return current, beta, weight, bias


@pytest.mark.parametrize("mode", ["feedforward", "detached", "attached"])
def test_dblock_under_autocast_runs_in_float32(kernel, mode):
    """Under CPU autocast a bf16 current gives the spikes and gradients of its float32 copy."""
    current, beta, weight, bias = _inputs()
    kw = dict(d=7, kernel=kernel)
    if mode != "feedforward":
        kw.update(recurrent_weight=weight, recurrent_bias=bias, detach_recurrent=mode == "detached")
    half = current.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes = F.dblock_neurons(half, beta, **kw)
    assert spikes.dtype == torch.bfloat16  # 0/1 are exact in bf16
    full = current.float().requires_grad_()
    want = F.dblock_neurons(full, beta, **kw)
    assert torch.equal(spikes.float(), want) and want.sum() > 0
    # the gradient reaching bf16 spikes is bf16: the float32 run gets the same rounded probe
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    (g_half,) = torch.autograd.grad((spikes.float() * probe).sum(), half)
    (g_full,) = torch.autograd.grad((want * probe).sum(), full)
    assert g_half.dtype == torch.bfloat16
    assert torch.equal(g_half, g_full.bfloat16())


def test_bf16_membrane_would_flip_spikes():
    """Why the upcast matters: integrating in bf16 itself gives other spikes."""
    current, beta, _, _ = _inputs(t=200, n=32)
    full = F.dblock_neurons(current.float(), beta, 2, kernel="loop")
    half = F.reference.dblock_neurons(current, beta.bfloat16(), 2)
    assert not torch.equal(full, half.float())


def test_lif_and_readout_under_autocast():
    current, beta, weight, bias = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes = F.lif_neurons(current, beta, weight, bias)
        logits = F.leaky_readout(current, beta, 7)
    assert spikes.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(spikes.float(), F.lif_neurons(current.float(), beta, weight, bias))
    torch.testing.assert_close(logits, F.leaky_readout(current.float(), beta, 7))


def _train(tmp_path, precision: str) -> tuple[float, set]:
    """Train a small d-block net on bursts; returns test accuracy and the projections' dtypes."""
    pl.seed_everything(0, verbose=False)
    dm = BurstsDataModule(tmp_path, n_train=1024, n_test=512, batch_size=64, val_fraction=0.0)
    net = SNNClassifier(n_in=64, n_hidden=64, n_classes=10, d=10, t_len=100)
    dtypes = set()
    for projection in (net.hidden[0].projection, net.readout.projection):
        projection.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    trainer = pl.Trainer(
        max_epochs=6,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    task = SNNTask(net, n_classes=10, lr=0.01)
    trainer.fit(task, datamodule=dm)
    return trainer.test(task, datamodule=dm, verbose=False)[0]["test/acc"], dtypes


@pytest.mark.slow
def test_bf16_mixed_training_close_to_float32(tmp_path):
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    acc32, dtypes32 = _train(tmp_path, "32")
    acc16, dtypes16 = _train(tmp_path, "bf16-mixed")
    assert dtypes32 == {torch.float32}
    assert dtypes16 == {torch.bfloat16}  # Lightning's bf16-mixed autocasts the projections
    assert acc32 > 0.5  # learned well beyond chance (0.1)
    assert abs(acc16 - acc32) <= 0.05, (acc16, acc32)


def test_bf16_true_trains_on_dense_input(tmp_path):
    """``trainer.precision=bf16-true`` with dense batches (the GPU default) stopped at the first
    step: "mat1 and mat2 must have the same dtype, but got Float and BFloat16" (float32 spikes
    into bfloat16 weights). The projection casts the 0/1 spikes to its weights' dtype."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    dm = BurstsDataModule(
        tmp_path, n_train=128, n_test=64, batch_size=32, val_fraction=0.0, input="dense"
    )
    net = SNNClassifier(n_in=64, n_hidden=16, n_classes=10, d=10, t_len=100)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision="bf16-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    task = SNNTask(net, n_classes=10, lr=0.01)
    trainer.fit(task, datamodule=dm)
    assert net.hidden[0].projection.weight.dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_16_true_is_refused_with_one_line(tmp_path):
    """float16 weights with Adam (eps 1e-8 is 0 in float16) turn the loss NaN in the first
    epoch: ``16-true`` is refused before training, naming what to use instead."""
    from dblock.errors import ConfigError
    from dblock.launch.config import check_config
    from tests.test_reliability import composed

    check_config(composed(tmp_path, "trainer.precision=bf16-true"))
    with pytest.raises(ConfigError, match=r"trainer.precision=16-true .*16-mixed.*bf16-true"):
        check_config(composed(tmp_path, "trainer.precision=16-true"))


def test_matmul_precision_high_allows_tf32_during_the_run_only(tmp_path):
    """``task.matmul_precision=high``: CUDA's float32 matmuls (the projections) may run in
    TF32 from setup to teardown, set through the per-backend API; ``highest`` (the default)
    touches nothing; anything else is refused naming the valid values."""
    from dblock.launch.config import check_config
    from tests.test_reliability import composed

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    net = SNNClassifier(n_in=4, n_hidden=3, n_classes=2, d=2, t_len=8)
    task = SNNTask(net, n_classes=2, matmul_precision="high")
    task.setup("fit")
    assert matmul.fp32_precision == "tf32"
    task.teardown("fit")
    assert matmul.fp32_precision == before
    default = SNNTask(net, n_classes=2)
    default.setup("fit")
    assert matmul.fp32_precision == before
    with pytest.raises(ValueError, match="unknown matmul_precision 'tf32'; valid: highest, high"):
        SNNTask(net, n_classes=2, matmul_precision="tf32")
    check_config(composed(tmp_path, "task.matmul_precision=high"))
