"""Modules that own parameters and call ``dblock.functional``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dblock import functional as F
from dblock.functional.readout import check_reduce, projected_readout
from dblock.values import positive_int

HIDDEN_BETA = math.exp(-1 / 10)
READOUT_BETA = math.exp(-1 / 20)


def _check_size(name: str, value: int) -> None:
    positive_int(name, value)


def _check_d(d: int, t_len: int | None) -> None:
    if t_len is not None:
        F.check_d(d, t_len)
    else:
        positive_int("d", d)


class Decay(nn.Module):
    """A trainable per-neuron decay ``beta``, clamped to [0, 1] on every use (the one place)."""

    def __init__(self, n: int, init: float) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.full((n,), float(init)))

    def forward(self) -> Tensor:
        return self.raw.clamp(0.0, 1.0)


class Projection(nn.Linear):
    """Input projection ``W x + b`` over every time step, (T, B, n_in) -> (T, B, n_out).

    ``x`` dense: a plain ``nn.Linear`` on the contiguous time-major layout, one matmul over all
    T * B rows, no transposing copy (on a permuted (B, n_in, T) view it is 2-4x slower on a CPU).
    ``x`` a sparse COO tensor (the input spikes as events, ``x.to_dense()`` the dense batch):
    ``F.event_linear``, whose cost grows with the number of events instead of T * B * n_in
    (other sparse layouts are converted to COO first). The output is dense either way.
    """

    def __init__(self, n_in: int, n_out: int, zero_bias: bool = True) -> None:
        super().__init__(n_in, n_out)  # W ~ U(+-sqrt(1/n_in)) is nn.Linear's default
        if zero_bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.layout == torch.strided:
            return super().forward(x)
        if x.layout != torch.sparse_coo:
            x = x.to_sparse_coo()
        return F.event_linear(x, self.weight, self.bias)


class DBlockLayer(nn.Module):
    """A hidden layer of d-block neurons (SPEC §3). (T, B, n_in) -> spikes (T, B, n_out)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        d: int,
        recurrent: bool = True,
        detach_recurrent: bool = True,
        t_len: int | None = None,
        beta_init: float = HIDDEN_BETA,
        scale: float = 10.0,
        kernel: str = "auto",
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        _check_size("n_in", n_in)
        _check_size("n_out", n_out)
        _check_d(d, t_len)
        F.check_kernel(kernel, chunk)
        self.d, self.detach_recurrent, self.scale = d, detach_recurrent, scale
        self.kernel, self.chunk = kernel, chunk
        self.projection = Projection(n_in, n_out)
        self.beta = Decay(n_out, beta_init)
        self.recurrent_weight = self.recurrent_bias = None
        if recurrent:
            bound = math.sqrt(1.0 / n_out)
            self.recurrent_weight = nn.Parameter(torch.empty(n_out, n_out).uniform_(-bound, bound))
            self.recurrent_bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.dblock_neurons(
            self.projection(x),
            self.beta(),
            self.d,
            self.recurrent_weight,
            self.recurrent_bias,
            self.detach_recurrent,
            self.scale,
            self.kernel,
            self.chunk,
        )


class LIFLayer(nn.Module):
    """A hidden layer of standard LIF neurons (SPEC §2). (T, B, n_in) -> spikes (T, B, n_out)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        recurrent: bool = True,
        beta_init: float = HIDDEN_BETA,
        scale: float = 10.0,
        **_: object,
    ) -> None:
        super().__init__()
        _check_size("n_in", n_in)
        _check_size("n_out", n_out)
        self.scale = scale
        self.projection = Projection(n_in, n_out)
        self.beta = Decay(n_out, beta_init)
        self.recurrent = nn.Linear(n_out, n_out) if recurrent else None  # default init (SPEC §2)

    def forward(self, x: Tensor) -> Tensor:
        weight = bias = None
        if self.recurrent is not None:
            weight, bias = self.recurrent.weight, self.recurrent.bias
        return F.lif_neurons(self.projection(x), self.beta(), weight, bias, self.scale)


class LeakyReadout(nn.Module):
    """Non-spiking leaky readout (SPEC §4). (T, B, n_in) spikes -> logits (B, n_classes)."""

    def __init__(
        self,
        n_in: int,
        n_classes: int,
        d: int | None = None,
        reduce: str = "sum",
        beta_init: float = READOUT_BETA,
    ) -> None:
        super().__init__()
        _check_size("n_classes", n_classes)
        check_reduce(reduce)
        self.d, self.reduce = d, reduce
        self.projection = Projection(n_in, n_classes)
        self.beta = Decay(n_classes, beta_init)

    def forward(self, spikes: Tensor) -> Tensor:
        p = self.projection
        return projected_readout(spikes, p.weight, p.bias, self.beta(), self.d, self.reduce)
