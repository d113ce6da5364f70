"""Fast kernels against the step-by-step reference (docs/model.md §2-4), and the model's
invariants."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dblock import functional as F
from dblock.functional import reference as R
from dblock.functional.readout import projected_readout
from tests.conftest import DEVICE

SHAPES = [  # (B, N, T, d)
    (3, 5, 20, 3),
    (2, 4, 17, 17),  # d = T
    (2, 3, 10, 1),  # d = 1
    (2, 6, 11, 4),  # remainder block longer than L
    (2, 6, 10, 4),  # remainder block as long as L
    (1, 7, 23, 5),  # batch 1
    (4, 8, 50, 7),
    (2, 3, 1, 1),  # T = 1
]


def make(b, n, t, seed=0, dtype=torch.float64):
    """Time-major current (T, B, N), beta, recurrent weight and bias."""
    g = torch.Generator().manual_seed(seed)
    current = (torch.randn(t, b, n, generator=g, dtype=dtype) * 0.8 + 0.45).requires_grad_()
    beta = (torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05).requires_grad_()
    weight = (torch.randn(n, n, generator=g, dtype=dtype) * 0.7).requires_grad_()
    bias = (torch.randn(n, generator=g, dtype=dtype) * 0.2).requires_grad_()
    return [x.detach().to(DEVICE).requires_grad_() for x in (current, beta, weight, bias)]


def grads(fn, inputs, seed=1):
    out = fn()
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    got = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)
    # an input that cannot matter (beta when every block has length 1) has zero gradient
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs, strict=True)]


@pytest.mark.parametrize("b,n,t,d", SHAPES)
@pytest.mark.parametrize("mode", ["feedforward", "detached", "attached"])
def test_dblock_matches_reference(b, n, t, d, mode, kernel):
    current, beta, weight, bias = make(b, n, t, seed=b * 100 + t)
    kw = {}
    if mode != "feedforward":
        kw = dict(recurrent_weight=weight, recurrent_bias=bias, detach_recurrent=mode == "detached")
    inputs = [current, beta] + ([weight, bias] if kw else [])
    fast, fast_g = grads(lambda: F.dblock_neurons(current, beta, d, **kw, kernel=kernel), inputs)
    ref, ref_g = grads(lambda: R.dblock_neurons(current, beta, d, **kw), inputs)
    assert fast.shape == (t, b, n)
    assert torch.equal(fast, ref)
    assert set(fast.unique().tolist()) <= {0.0, 1.0}
    for got, want in zip(fast_g, ref_g, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_dblock_float32_spikes_match_reference(kernel):
    current, beta, weight, bias = make(8, 16, 64, dtype=torch.float32)
    fast = F.dblock_neurons(current, beta, 8, weight, bias, kernel=kernel)
    ref = R.dblock_neurons(current, beta, 8, weight, bias)
    assert (fast != ref).float().mean() < 1e-3  # float32 rounding may flip a spike at U == 1


@pytest.mark.parametrize("b,n,t,d", SHAPES)
def test_one_spike_per_block(b, n, t, d, kernel):
    current, beta, weight, bias = make(b, n, t)
    spikes = F.dblock_neurons(current * 3, beta, d, weight, bias, kernel=kernel)
    start = 0
    for length in F.block_lengths(t, d):
        assert spikes[start : start + length].sum(0).max() <= 1
        start += length


def test_block_lengths():
    assert F.block_lengths(10, 3) == [3, 3, 3, 1]
    assert F.block_lengths(11, 4) == [2, 2, 2, 2, 3]
    assert F.block_lengths(9, 3) == [3, 3, 3]
    assert F.block_lengths(5, 5) == [1] * 5
    assert sum(F.block_lengths(500, 30)) == 500


def test_recurrent_spike_arrives_at_next_block_start(kernel):
    """Neuron 0 fires mid-block 0; neuron 1 (no input of its own) fires at block 1's start."""
    t, d = 12, 3  # blocks [0,4) [4,8) [8,12)
    current = torch.zeros(t, 1, 2, dtype=torch.float64, device=DEVICE)
    current[2, 0, 0] = 5.0  # neuron 0 fires at t = 2, in block 0 only
    beta = torch.full((2,), 0.5, dtype=torch.float64, device=DEVICE)
    weight = torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64, device=DEVICE)
    for fn in (partial(F.dblock_neurons, kernel=kernel), R.dblock_neurons):
        spikes = fn(current, beta, d, weight, None)
        assert spikes[:, 0, 0].nonzero().flatten().tolist() == [2]
        assert spikes[:, 0, 1].nonzero().flatten().tolist() == [4]


def test_recurrent_effect_is_delayed_by_one_block(kernel):
    current, beta, weight, bias = make(2, 6, 24)
    base = F.dblock_neurons(current, beta, 4, weight, bias, kernel=kernel)
    other = F.dblock_neurons(current, beta, 4, weight * 3, bias + 1, kernel=kernel)
    assert torch.equal(base[:6], other[:6])  # block 0 cannot see the recurrence
    assert not torch.equal(base[6:], other[6:])


def test_d1_recurrence_has_no_effect(kernel):
    current, beta, weight, bias = make(3, 5, 30)
    ff = F.dblock_neurons(current, beta, 1, kernel=kernel)
    rec = F.dblock_neurons(current, beta, 1, weight, bias, kernel=kernel)
    assert torch.equal(ff, rec)


@pytest.mark.parametrize("bad", [0, -1, 21, 2.5])
def test_d_out_of_range(bad):
    current, beta, _, _ = make(1, 2, 20)
    with pytest.raises(ValueError, match=rf"d={bad}.*T=20|T=20.*d={bad}"):
        F.dblock_neurons(current, beta, bad)


def test_fast_sigmoid_gradient():
    x = torch.tensor([-0.2, 0.0, 0.1, 0.5], dtype=torch.float64, requires_grad=True)
    s = F.fast_sigmoid(x, 10.0)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0]  # strict: H(0) = 0
    (g,) = torch.autograd.grad(s.sum(), x)
    torch.testing.assert_close(g, 1 / (10 * x.detach().abs() + 1) ** 2)


@pytest.mark.parametrize("b,n,t,d", SHAPES[:5])
@pytest.mark.parametrize("recurrent", [False, True])
def test_lif_matches_reference(b, n, t, d, recurrent):
    current, beta, weight, bias = make(b, n, t, seed=t)
    kw = dict(recurrent_weight=weight, recurrent_bias=bias) if recurrent else {}
    inputs = [current, beta] + ([weight, bias] if recurrent else [])
    fast, fast_g = grads(lambda: F.lif_neurons(current, beta, **kw), inputs)
    ref, ref_g = grads(lambda: R.lif_neurons(current, beta, **kw), inputs)
    assert torch.equal(fast, ref)
    for got, want in zip(fast_g, ref_g, strict=True):
        torch.testing.assert_close(got, want)


def test_lif_multi_spike_and_reset():
    current = torch.full((6, 1, 1), 1.5, dtype=torch.float64, device=DEVICE)
    spikes = F.lif_neurons(current, torch.tensor([1.0], dtype=torch.float64, device=DEVICE))
    # V: 1.5 (S) -> 0.5+1.5=2.0 (S) -> 2.5 (S) ...: a neuron may fire at every step
    assert spikes.flatten().tolist() == [1.0] * 6


@pytest.mark.parametrize("d", [None, 1, 3, 7, 20])
@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_readout_matches_reference(d, reduce):
    current, beta, _, _ = make(3, 4, 20)
    fast, fast_g = grads(lambda: F.leaky_readout(current, beta, d, reduce), [current, beta])
    ref, ref_g = grads(lambda: R.leaky_readout(current, beta, d, reduce), [current, beta])
    torch.testing.assert_close(fast, ref)
    for got, want in zip(fast_g, ref_g, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "b,n,t,d",
    [(3, 5, 20, None), (2, 4, 17, 17), (2, 3, 10, 1), (1, 7, 23, 5), (2, 6, 11, 4), (2, 3, 1, 1)],
)
@pytest.mark.parametrize(
    "reduce,beta_value", [("sum", None), ("sum", 0.0), ("sum", 1.0), ("max", None)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_projected_readout_matches_the_reference_of_the_projection(
    b, n, t, d, reduce, beta_value, seed
):
    """The readout weighted over time before its projection equals the reference readout of
    ``W S + b``, values and gradients (spikes, weight, bias, beta).

    Everything is drawn from the test's own generator. ``max`` reads real-valued counts: over
    binary spikes two steps can hold the same value (always at d = T), a tie whose subgradient
    split is a convention that differs between ``torch.maximum`` and ``amax``."""
    g = torch.Generator().manual_seed(1000 * seed + 10 * t + n)
    draw = torch.rand(t, b, n, generator=g, dtype=torch.float64)
    spikes = (draw < 0.3).double() if reduce == "sum" else draw * 3
    weight = torch.randn(4, n, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    beta = torch.rand(4, generator=g) if beta_value is None else torch.full((4,), beta_value)
    inputs = [x.double().to(DEVICE).requires_grad_() for x in (spikes, weight, bias, beta)]
    spikes, weight, bias, beta = inputs
    fast, fast_g = grads(lambda: projected_readout(spikes, weight, bias, beta, d, reduce), inputs)
    ref, ref_g = grads(
        lambda: R.leaky_readout(torch.nn.functional.linear(spikes, weight, bias), beta, d, reduce),
        inputs,
    )
    torch.testing.assert_close(fast, ref)
    for got, want in zip(fast_g, ref_g, strict=True):
        torch.testing.assert_close(got, want)


def test_projected_readout_float32_and_no_bias():
    g = torch.Generator().manual_seed(0)
    spikes = (torch.rand(50, 4, 8, generator=g) < 0.2).float()
    weight, beta = torch.randn(3, 8, generator=g), torch.rand(3, generator=g)
    spikes, weight, beta = spikes.to(DEVICE), weight.to(DEVICE), beta.to(DEVICE)
    got = projected_readout(spikes, weight, None, beta, 7)
    want = R.leaky_readout(spikes @ weight.t(), beta, 7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_readout_restarts_at_blocks():
    current = torch.zeros(6, 1, 1, dtype=torch.float64, device=DEVICE)
    current[0, 0, 0] = 1.0
    beta = torch.tensor([0.5], dtype=torch.float64, device=DEVICE)
    assert F.leaky_readout(current, beta, None).item() == pytest.approx(
        1 + 0.5 + 0.25 + 0.125 + 0.0625 + 0.03125
    )
    assert F.leaky_readout(current, beta, 2).item() == pytest.approx(1 + 0.5 + 0.25)


def test_unknown_reduce():
    current, beta, _, _ = make(1, 2, 5)
    with pytest.raises(ValueError, match="sum, max"):
        F.leaky_readout(current, beta, None, "mean")


@pytest.mark.parametrize("d", [None, 3, 7])
def test_readout_needs_no_float_cumsum_under_deterministic_algorithms(d):
    """The readout runs in every forward: its step weights came from a float cumsum (and the
    backward of a cumprod, another), which CUDA refuses under deterministic algorithms."""
    from tests.test_kernels import deterministic_cuda

    current, beta, weight, bias = make(3, 4, 20)
    spikes = (current.detach() > 0.3).double().requires_grad_()
    inputs = [current, beta, spikes, weight, bias]

    def go():
        logits = F.leaky_readout(current, beta, d) + projected_readout(
            spikes, weight, bias, beta, d
        )
        return logits, torch.autograd.grad(logits.square().sum(), inputs)

    with deterministic_cuda():
        got, got_g = go()
    want, want_g = go()
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w)


SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_consecutive",
            "bincount", "repeat_interleave", "masked_select", "item"}  # fmt: skip


@pytest.mark.parametrize("kernel_name", ["loop", "chunked"])
def test_no_host_sync_in_the_forward_and_backward(kernel_name):
    """No op whose result the host must wait for (``.item()``, ``nonzero``, ``bincount``, ...)
    in a forward + backward of the functional layer: d-block (feedforward, detached and
    attached recurrence), LIF, readout (sum and max), the event-driven projection. On a GPU each
    would stall the host until the device catches up. The readout copied an index to the
    device in every forward; the sparse projection's ``bincount`` read its largest index."""
    from dblock.functional.event_linear import event_linear
    from experiments.dispatch_count import DispatchCount

    current, beta, weight, bias = make(2, 5, 30, seed=4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 2, 7, generator=g, dtype=torch.float64) < 0.2).double().to(DEVICE)
    x_sparse = x.to_sparse_coo().coalesce()
    w_in = torch.randn(5, 7, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    with DispatchCount() as count:
        out = 0
        for kw in ({}, dict(recurrent_weight=weight, recurrent_bias=bias),
                   dict(recurrent_weight=weight, detach_recurrent=False)):  # fmt: skip
            out = out + F.dblock_neurons(current, beta, 4, kernel=kernel_name, **kw).sum()
        out = out + F.lif_neurons(current, beta, weight, bias).sum()
        for reduce in ("sum", "max"):
            out = out + F.leaky_readout(current, beta, 4, reduce).sum()
            out = out + projected_readout(current, weight, bias, beta, 4, reduce).sum()
        out = out + event_linear(x_sparse, w_in, None).sum()
        out.backward()
    assert count.ops > 50
    assert not SYNC_OPS & set(count.by_op), sorted(SYNC_OPS & set(count.by_op))


class _HostTensors(TorchDispatchMode):
    """Records the ops that read or make a CPU tensor (run on ``meta`` tensors: any CPU tensor
    is one the host made and a GPU would have to receive)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in flat):
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("kernel_name", ["loop", "chunked"])
def test_nothing_is_made_on_the_host_in_a_forward(kernel_name, monkeypatch):
    """Every index and constant of a forward + backward is made on the inputs' device: the
    readout built its step index on the host and copied it to the device in every forward.
    (The ``meta`` device has no autocast: the test gives it the CPU's.)"""
    enabled, autocast = torch.is_autocast_enabled, torch.autocast
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda kind: enabled("cpu"))
    monkeypatch.setattr(torch, "autocast", lambda kind, **kw: autocast("cpu", **kw))
    current, beta, weight, bias = (x.detach().to("meta").requires_grad_() for x in make(2, 5, 30))
    with _HostTensors() as host:
        out = F.dblock_neurons(current, beta, 4, weight, bias, kernel=kernel_name).sum()
        out = out + F.leaky_readout(current, beta, 4).sum()
        out = out + projected_readout(current, weight, bias, beta, 7).sum()
        out.backward()
    assert host.ops == []
