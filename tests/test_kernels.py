"""Every d-block kernel against the step-by-step reference: long blocks, odd layouts."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dblock import functional as F
from dblock.functional import reference as R
from dblock.functional.blocks.arithmetic import block_groups
from tests.conftest import DEVICE


class CudaDeterminism(TorchDispatchMode):
    """CUDA's refusal under ``torch.use_deterministic_algorithms(True)``, on any device: a float
    ``cumsum`` raises (CUDA has no deterministic scan for it; ``trainer.deterministic=true``).
    Use as ``with deterministic_cuda(): ...``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (
            func.overloadpacket in (torch.ops.aten.cumsum, torch.ops.aten.cumsum_)
            and torch.are_deterministic_algorithms_enabled()
            and (args[0].is_floating_point() or kwargs and kwargs.get("dtype") in FLOATS)
        ):
            raise RuntimeError("cumsum_cuda_kernel does not have a deterministic implementation")
        return func(*args, **(kwargs or {}))


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextmanager
def deterministic_cuda():
    """Deterministic algorithms on, with ``CudaDeterminism`` refusing what CUDA refuses."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with CudaDeterminism():
            yield
    finally:
        torch.use_deterministic_algorithms(old)


LONG = [  # (B, N, T, d): long blocks, remainders of every kind
    (2, 5, 300, 2),
    (1, 4, 301, 3),
    (3, 3, 128, 1),
    (2, 6, 97, 10),
    (2, 4, 64, 64),
]


def make(b, n, t, seed, dtype=torch.float64):
    """Time-major current (T, B, N), beta, recurrent weight and bias."""
    g = torch.Generator().manual_seed(seed)
    current = (torch.randn(t, b, n, generator=g, dtype=dtype) * 0.6 + 0.2).requires_grad_()
    beta = (torch.rand(n, generator=g, dtype=dtype) * 0.3 + 0.7).requires_grad_()
    weight = (torch.randn(n, n, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = (torch.randn(n, generator=g, dtype=dtype) * 0.1).requires_grad_()
    return [x.detach().to(DEVICE).requires_grad_() for x in (current, beta, weight, bias)]


def check(fn_fast, fn_ref, inputs, seed=3, rtol=1e-9, atol=1e-9):
    """Spikes identical; gradients of a random projection of the spikes close."""
    fast, ref = fn_fast(), fn_ref()
    assert torch.equal(fast, ref)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(fast.shape, generator=gen, dtype=fast.dtype).to(fast.device)
    got = torch.autograd.grad((fast * probe).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref * probe).sum(), inputs, allow_unused=True)
    for g, w, x in zip(got, want, inputs, strict=True):
        g = torch.zeros_like(x) if g is None else g
        w = torch.zeros_like(x) if w is None else w
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return fast


@pytest.mark.parametrize("b,n,t,d", LONG)
@pytest.mark.parametrize("recurrent", [False, True])
def test_long_blocks_match_reference(b, n, t, d, recurrent, kernel):
    current, beta, weight, bias = make(b, n, t, seed=t + d)
    kw = dict(recurrent_weight=weight, recurrent_bias=bias) if recurrent else {}
    inputs = [current, beta] + ([weight, bias] if recurrent else [])
    spikes = check(
        lambda: F.dblock_neurons(current, beta, d, **kw, kernel=kernel),
        lambda: R.dblock_neurons(current, beta, d, **kw),
        inputs,
    )
    assert spikes.sum() > 0  # the inputs drive the neurons over threshold


@pytest.mark.parametrize("beta_value", [0.0, 1.0])
def test_beta_at_the_clamp_edges(beta_value, kernel):
    current, _, weight, bias = make(2, 4, 40, seed=5)
    beta = torch.full((4,), beta_value, dtype=torch.float64, device=DEVICE, requires_grad=True)
    check(
        lambda: F.dblock_neurons(current, beta, 3, weight, bias, kernel=kernel),
        lambda: R.dblock_neurons(current, beta, 3, weight, bias),
        [current, beta, weight, bias],
    )


def test_recurrent_without_bias_and_noncontiguous_current(kernel):
    current, beta, weight, _ = make(3, 5, 60, seed=7)
    # a batch-major (B, N, T) tensor seen time-major through a permuted view: correct, if slower
    batch_major = current.detach().permute(1, 2, 0).contiguous().requires_grad_()
    check(
        lambda: F.dblock_neurons(batch_major.permute(2, 0, 1), beta, 6, weight, kernel=kernel),
        lambda: R.dblock_neurons(batch_major.permute(2, 0, 1), beta, 6, weight),
        [batch_major, beta, weight],
    )


def test_sum_loss_gradient_through_expanded_grad(kernel):
    """``spikes.sum()`` hands the kernel a stride-0 gradient; it must be read correctly."""
    current, beta, weight, bias = make(2, 3, 50, seed=11)
    grads = []
    for fn in (partial(F.dblock_neurons, kernel=kernel), R.dblock_neurons):
        out = fn(current, beta, 4, weight, bias)
        grads.append(torch.autograd.grad(out.sum(), [current, beta, weight, bias]))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_float32_matches_reference_in_float32(kernel):
    current, beta, weight, bias = make(4, 8, 200, seed=13, dtype=torch.float32)
    check(
        lambda: F.dblock_neurons(current, beta, 5, weight, bias, kernel=kernel),
        lambda: R.dblock_neurons(current, beta, 5, weight, bias),
        [current, beta, weight, bias],
        rtol=1e-4,
        atol=1e-4,
    )


def test_attached_recurrence_uses_kernel_and_matches(kernel):
    current, beta, weight, bias = make(2, 4, 90, seed=17)
    kw = dict(recurrent_weight=weight, recurrent_bias=bias, detach_recurrent=False)
    check(
        lambda: F.dblock_neurons(current, beta, 4, **kw, kernel=kernel),
        lambda: R.dblock_neurons(current, beta, 4, **kw),
        [current, beta, weight, bias],
    )


def test_block_groups():
    assert block_groups(F.block_lengths(10, 3)) == [(0, 3, 3), (9, 1, 1)]
    assert block_groups(F.block_lengths(11, 4)) == [(0, 4, 2), (8, 1, 3)]
    assert block_groups(F.block_lengths(10, 4)) == [(0, 5, 2)]  # remainder as long as L
    assert block_groups(F.block_lengths(7, 7)) == [(0, 7, 1)]


@pytest.mark.parametrize("recurrent", [False, True])
def test_deterministic_algorithms_need_no_float_cumsum(kernel, recurrent):
    """``trainer.deterministic=true`` on a GPU: a float cumsum raises there, and the chunked
    backward used two (the straight-through running sums). Forward and backward run under
    the emulated refusal and give the gradients of the unrestricted run."""
    current, beta, weight, bias = make(2, 5, 97, seed=7)
    kw = dict(recurrent_weight=weight, recurrent_bias=bias) if recurrent else {}
    fn = partial(F.dblock_neurons, current, beta, 10, kernel=kernel, **kw)
    inputs = [current, beta] + ([weight, bias] if recurrent else [])
    with deterministic_cuda():
        spikes = fn()
        got = torch.autograd.grad(spikes.sum() + (spikes * current).sum(), inputs)
    want_spikes = fn()
    want = torch.autograd.grad(want_spikes.sum() + (want_spikes * current).sum(), inputs)
    assert torch.equal(spikes, want_spikes)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
