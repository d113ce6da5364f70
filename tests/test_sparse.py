"""Sparse input: the event store's sparse batches and the event-driven input projection give the
dense path's counts, spikes, loss and gradients (float64: equal up to summation order)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as TF

from datamodules.store import EventStore
from dblock import functional as F
from dblock.models import SNNClassifier
from dblock.nn import Projection
from tests.conftest import DEVICE


def raw_store(n=9, n_in=7, t_len=12, seed=0, shuffle=True) -> tuple[EventStore, torch.Tensor]:
    """A store from raw events (repeats, an empty sample, events in any order) and the dense
    (T, n, n_in) counts they make, counted by hand."""
    g = torch.Generator().manual_seed(seed)
    per = torch.randint(0, 30, (n,), generator=g)
    per[2] = 0  # an empty sample
    units = torch.randint(0, n_in, (int(per.sum()),), generator=g)
    bins = torch.randint(0, t_len, (int(per.sum()),), generator=g)
    units[:6], bins[:6] = 3, 1  # one (bin, unit) repeated within sample 0 (30 events at most)
    per[0] = max(int(per[0]), 6)
    units, bins = units[: int(per.sum())], bins[: int(per.sum())]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)])
    want = torch.zeros(t_len, n, n_in, dtype=torch.float64)
    sample = torch.repeat_interleave(torch.arange(n), per)
    want.index_put_((bins, sample, units), torch.ones(len(units), dtype=torch.float64), True)
    if shuffle:  # each sample's events in a random order
        starts = offsets[:-1]
        order = [a + torch.randperm(int(c), generator=g) for a, c in zip(starts, per, strict=True)]
        order = torch.cat(order)
        units, bins = units[order], bins[order]
    store = EventStore(
        units.short(), bins.short(), offsets, torch.arange(n) % 3, n_in=n_in, t_len=t_len
    )
    return store, want


def test_store_holds_each_samples_events_in_order_with_repeats():
    store, want = raw_store()
    assert store.n_events == int(want.sum()) and int(store.repeats.max()) >= 6
    assert store.n_entries == int((want > 0).sum())
    for i in range(len(store)):
        a, e = int(store.offsets[i]), int(store.offsets[i + 1])
        key = store.bins[a:e].long() * store.n_in + store.units[a:e].long()
        assert bool((key[1:] > key[:-1]).all())  # sorted by (bin, unit), each once
    ordered, _ = raw_store(shuffle=False)
    assert all(torch.equal(getattr(store, k), getattr(ordered, k)) for k in ("units", "repeats"))


@pytest.mark.parametrize("idx", [[0, 1, 2, 3, 4, 5, 6, 7, 8], [4, 0, 4, 2], [2], [8]])
def test_sparse_batch_is_the_dense_batch_coalesced(idx):
    """Any sample order, a sample twice (padded DDP shards), an empty sample, batch 1."""
    store, want = raw_store()
    store = store.to(DEVICE)
    idx = torch.tensor(idx)
    x = store.sparse(idx.to(DEVICE), torch.float64)
    assert x.layout == torch.sparse_coo and x.is_coalesced() and x.shape == (12, len(idx), 7)
    assert torch.equal(x.to_dense().cpu(), want[:, idx])
    assert torch.equal(store.dense(idx.to(DEVICE), torch.float64).cpu(), want[:, idx])
    # the coalesced flag is true: coalescing a copy that does not claim it changes nothing
    again = torch.sparse_coo_tensor(x._indices(), x._values(), x.shape, check_invariants=True)
    again = again.coalesce()
    assert torch.equal(again._indices(), x._indices()) and torch.equal(again._values(), x._values())


def events(t_len, b, n_in, seed=0, empty=(), dtype=torch.float64) -> torch.Tensor:
    """Dense time-major counts, about 10 % non-zero, some 2s and 3s; samples in ``empty`` silent."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(t_len, b, n_in, generator=g) < 0.1).to(dtype)
    x *= torch.randint(1, 4, x.shape, generator=g).to(dtype)
    x[:, list(empty)] = 0
    return x


CASES = [  # model, recurrent, layers, T, B, d, empty samples
    ("dblock", True, 2, 30, 4, 4, (1,)),
    ("dblock", False, 2, 30, 4, 5, ()),
    ("dblock", True, 1, 1, 3, 1, ()),  # T = 1
    ("dblock", True, 1, 25, 1, 3, ()),  # batch 1
    ("standard", True, 2, 30, 4, 1, (0, 3)),
    ("standard", False, 1, 20, 2, 1, ()),
    ("dblock", True, 1, 10, 3, 2, (0, 1, 2)),  # no event at all
]


@pytest.mark.parametrize("model,recurrent,layers,t_len,b,d,empty", CASES)
def test_training_step_with_sparse_input_matches_dense(
    model, recurrent, layers, t_len, b, d, empty
):
    n_in = 13
    x = events(t_len, b, n_in, seed=t_len + b, empty=empty).to(DEVICE)
    y = torch.arange(b, device=DEVICE) % 5
    torch.manual_seed(0)
    net = SNNClassifier(n_in, 16, layers, 5, model=model, d=d, recurrent=recurrent, t_len=t_len)
    net = net.double()
    with torch.no_grad():  # a non-zero input bias, and enough drive for spikes
        net.hidden[0].projection.bias.uniform_(-0.2, 0.4)
        net.hidden[0].projection.weight.mul_(4.0)
    net = net.to(DEVICE)
    spikes = []
    for layer in net.hidden:
        layer.register_forward_hook(lambda m, i, out: spikes.append(out.detach()))

    def step(inp):
        net.zero_grad(set_to_none=True)
        out = net(inp)
        TF.cross_entropy(out.logits, y).backward()
        return out, [p.grad for p in net.parameters()]  # None where unused (T = 1)

    dense, dense_grads = step(x)
    dense_spikes, spikes[:] = list(spikes), []
    sparse, sparse_grads = step(x.to_sparse())
    assert [s.sum().item() for s in dense_spikes][0] > 0 or not x.any()
    assert all(torch.equal(a, b) for a, b in zip(dense_spikes, spikes, strict=True))
    assert torch.equal(dense.spikes, sparse.spikes)
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=1e-12, atol=1e-12)
    for got, want in zip(sparse_grads, dense_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_uncoalesced_input_adds_repeats_and_any_leading_shape_works():
    proj = Projection(6, 4, zero_bias=False).double().to(DEVICE)
    i = torch.tensor([[0, 1, 0, 0, 1], [2, 0, 2, 2, 5]], device=DEVICE)  # (0, 2) three times
    ones = torch.ones(5, dtype=torch.float64, device=DEVICE)
    x = torch.sparse_coo_tensor(i, ones, (2, 6), check_invariants=True)
    assert not x.is_coalesced()
    torch.testing.assert_close(proj(x), proj(x.to_dense()))
    x4 = events(3, 2, 6, seed=5).to(DEVICE).view(3, 2, 1, 6)  # (T, B, 1, n_in)
    torch.testing.assert_close(proj(x4.to_sparse()), proj(x4))
    csr = events(5, 1, 6, seed=6).to(DEVICE)[:, 0].to_sparse_csr()  # another layout: converted
    torch.testing.assert_close(proj(csr), proj(csr.to_dense()))


def test_sparse_input_that_requires_grad_gets_the_dense_gradient_at_its_events():
    proj = Projection(9, 5, zero_bias=False).double().to(DEVICE)
    x = events(6, 3, 9, seed=2).to(DEVICE)
    xd = x.clone().requires_grad_()
    xs = x.to_sparse().requires_grad_()
    probe = torch.randn(6, 3, 5, dtype=torch.float64, device=DEVICE)
    (proj(xd) * probe).sum().backward()
    (proj(xs) * probe).sum().backward()
    assert xs.grad.layout == torch.sparse_coo
    torch.testing.assert_close(xs.grad.to_dense(), xd.grad * (x != 0))


def test_event_linear_names_bad_input():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="units but the weight"):
        F.event_linear(torch.zeros(3, 5).to_sparse(), w)
    with pytest.raises(ValueError, match="dense dimensions"):
        F.event_linear(torch.ones(3, 2, 6).to_sparse(sparse_dim=2), w)
    with pytest.raises(TypeError, match="sparse COO"):
        F.event_linear(torch.zeros(3, 6), w)


def test_sparse_projection_under_autocast_is_half_precision_like_the_dense_one():
    device = DEVICE.type
    half = torch.bfloat16
    proj = Projection(40, 8, zero_bias=False).to(DEVICE)
    x = events(20, 4, 40, seed=3, dtype=torch.float32).to(DEVICE)
    with torch.autocast(device, dtype=half):
        dense, sparse = proj(x), proj(x.to_sparse())
    assert dense.dtype == sparse.dtype == half
    # both round W to bf16; the sparse sum is accumulated in float32 as the matmul's is
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
    sparse.float().sum().backward()
    assert proj.weight.grad.dtype == torch.float32 and proj.weight.grad.abs().sum() > 0
