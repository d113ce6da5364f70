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


def check_input(x: Tensor, n_in: int, name: str, t_len: int | None = None) -> None:
    """Refuse an input that is not time-major (T, B, n_in), naming the shape it got.

    ``t_len``: the T the module was built for; an input with another time axis (for example a
    batch-first (B, T, n_in) tensor) is refused instead of silently giving wrong results.
    """
    shape = tuple(x.shape)
    layout = f"time-major (T, B, n_in={n_in})" if t_len is None else (
        f"time-major (T={t_len}, B, n_in={n_in})"
    )
    if len(shape) != 3:
        raise ValueError(
            f"{name} expects a {layout} input, got a {len(shape)}-D input of shape {shape}; "
            "add the missing axis (a single sample is x[:, None, :]) or move time first"
        )
    if shape[2] != n_in:
        raise ValueError(
            f"{name} expects a {layout} input, got shape {shape}: its last axis has "
            f"{shape[2]} inputs, not n_in={n_in}"
        )
    if t_len is not None and shape[0] != t_len:
        hint = (
            "; it looks batch-first (B, T, n_in): pass x.transpose(0, 1).contiguous()"
            if shape[1] == t_len
            else ""
        )
        raise ValueError(
            f"{name} was built for T={t_len} time steps and expects a {layout} input, got "
            f"shape {shape} (T={shape[0]}){hint}"
        )


def _check_d(d: int, t_len: int | None) -> None:
    if t_len is not None:
        F.check_d(d, t_len)
    else:
        positive_int("d", d)


class Decay(nn.Module):
    """A trainable per-neuron decay ``beta``, clamped to [0, 1] on every use (the one place).

    Args:
        n: number of neurons.
        init: initial value of every neuron's beta (for example ``exp(-dt / tau)``).

    Calling it returns the clamped decay, shape (n,).
    """

    def __init__(self, n: int, init: float) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.full((n,), float(init)))

    def forward(self) -> Tensor:
        """The decay ``beta`` clamped to [0, 1], shape (n,)."""
        return self.raw.clamp(0.0, 1.0)


class Projection(nn.Linear):
    """Input projection ``W x + b`` over every time step, (T, B, n_in) -> (T, B, n_out).

    ``x`` dense: a plain ``nn.Linear`` on the contiguous time-major layout, one matmul over all
    T * B rows, no transposing copy (on a permuted (B, n_in, T) view it is 2-4x slower on a CPU).
    ``x`` a sparse COO tensor (the input spikes as events, ``x.to_dense()`` the dense batch):
    ``F.event_linear``, whose cost grows with the number of events instead of T * B * n_in
    (other sparse layouts are converted to COO first). The output is dense either way.
    A dense ``x`` of another floating dtype than the weight (float32 spikes into the bfloat16 or
    float16 weights of Lightning's ``bf16-true`` / ``16-true``) is cast to the weight's dtype:
    spikes are 0 or 1, exact in every dtype.

    Args:
        n_in: input features per time step.
        n_out: output features (neurons) per time step.
        zero_bias: start the bias at 0 (the weight keeps ``nn.Linear``'s U(+-sqrt(1/n_in))).
    """

    def __init__(self, n_in: int, n_out: int, zero_bias: bool = True) -> None:
        super().__init__(n_in, n_out)  # W ~ U(+-sqrt(1/n_in)) is nn.Linear's default
        if zero_bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``W x + b`` of ``x`` (..., n_in), dense or sparse COO; returns dense (..., n_out)."""
        if x.layout == torch.strided:
            if x.dtype != self.weight.dtype and x.is_floating_point():
                x = x.to(self.weight.dtype)
            return super().forward(x)
        if x.layout != torch.sparse_coo:
            x = x.to_sparse_coo()
        return F.event_linear(x, self.weight, self.bias)


class DBlockLayer(nn.Module):
    """A hidden layer of d-block neurons (docs/model.md §3). (T, B, n_in) -> spikes (T, B, n_out).

    The T time steps are split into ``d`` blocks (the last one takes the remainder); inside a
    block each neuron fires at most once and its membrane is computed for all steps at once, so
    the layer runs ``d`` sequential block steps instead of T time steps.

    Args:
        n_in: inputs per time step.
        n_out: neurons in the layer.
        d: number of blocks, ``1 <= d <= T``.
        recurrent: add recurrent weights (n_out, n_out) and bias (n_out,): the spikes of a
            block feed the first step of the next block.
        detach_recurrent: stop the gradient through the fed-back spikes (the paper's default).
        t_len: T, when known: ``d`` is checked against it here, and ``forward`` refuses an
            input whose time axis is not T. None: any T >= d is accepted.
        beta_init: initial membrane decay of every neuron (``exp(-1/10)``: tau = 10 steps).
        scale: slope of the fast-sigmoid surrogate gradient.
        kernel: ``auto`` (loop on the CPU, chunked elsewhere) | ``loop`` | ``chunked``.
        chunk: the chunked kernel's chunk length in steps; None: about sqrt(T / d).

    Input: ``x`` time-major (T, B, n_in), dense or a sparse COO tensor of counts.
    Returns: spikes (T, B, n_out), 0 or 1, in the input projection's dtype.

    Raises:
        ValueError: at construction, for a bad size, d, kernel or chunk; in ``forward``, for an
            input that is not (T, B, n_in) or whose T is not ``t_len`` or is smaller than d.
    """

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
        self.n_in, self.n_out, self.t_len = n_in, n_out, t_len
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
        """Spikes (T, B, n_out) of the input ``x`` (T, B, n_in)."""
        check_input(x, self.n_in, "DBlockLayer", self.t_len)
        if self.d > x.shape[0]:
            raise ValueError(
                f"DBlockLayer(d={self.d}) got an input with T={x.shape[0]} time steps (shape "
                f"{tuple(x.shape)}, time-major (T, B, n_in)): d={self.d} is out of range for "
                f"T={x.shape[0]}; d must satisfy 1 <= d <= T"
            )
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
    """A hidden layer of standard LIF neurons (docs/model.md §2): (T, B, n_in) -> (T, B, n_out).

    ``V_t = beta (V_{t-1} - S_{t-1}) + W x_t + b [+ W_rec S_{t-1} + b_rec]``, ``S_t = H(V_t -
    1)``: reset by subtraction, several spikes per neuron allowed, T sequential steps.

    Args:
        n_in: inputs per time step.
        n_out: neurons in the layer.
        recurrent: add a recurrent ``nn.Linear(n_out, n_out)`` (its spikes are detached).
        beta_init: initial membrane decay of every neuron (``exp(-1/10)``: tau = 10 steps).
        scale: slope of the fast-sigmoid surrogate gradient.
        t_len: T, when known: ``forward`` refuses an input whose time axis is not T.
        **_: the d-block settings (``d``, ``detach_recurrent``, ``kernel``, ``chunk``) are
            accepted and ignored, so both layers take the same arguments.

    Input: ``x`` time-major (T, B, n_in), dense or a sparse COO tensor of counts.
    Returns: spikes (T, B, n_out), 0 or 1.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        recurrent: bool = True,
        beta_init: float = HIDDEN_BETA,
        scale: float = 10.0,
        t_len: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        _check_size("n_in", n_in)
        _check_size("n_out", n_out)
        if t_len is not None:
            _check_size("t_len", t_len)
        self.n_in, self.n_out, self.t_len = n_in, n_out, t_len
        self.scale = scale
        self.projection = Projection(n_in, n_out)
        self.beta = Decay(n_out, beta_init)
        # nn.Linear's default init (docs/model.md §2)
        self.recurrent = nn.Linear(n_out, n_out) if recurrent else None

    def forward(self, x: Tensor) -> Tensor:
        """Spikes (T, B, n_out) of the input ``x`` (T, B, n_in)."""
        check_input(x, self.n_in, "LIFLayer", self.t_len)
        weight = bias = None
        if self.recurrent is not None:
            weight, bias = self.recurrent.weight, self.recurrent.bias
        return F.lif_neurons(self.projection(x), self.beta(), weight, bias, self.scale)


class LeakyReadout(nn.Module):
    """Non-spiking leaky readout (docs/model.md §4). (T, B, n_in) spikes -> logits (B, n_classes).

    ``U_t = beta U_{t-1} + W S_t + b``; the logits are ``sum_t U_t`` (``reduce="sum"``) or
    ``max_t U_t`` (``"max"``).

    Args:
        n_in: spiking inputs per time step (the last hidden layer's size).
        n_classes: number of classes (output units).
        d: restart ``U`` at 0 at every block boundary of a d-block split into ``d`` blocks
            (the d-block model's readout); None: never (the standard SNN's).
        reduce: ``"sum"`` or ``"max"`` over time.
        beta_init: initial decay of every output unit (``exp(-1/20)``: tau = 20 steps).

    Input: spikes (T, B, n_in). Returns: logits (B, n_classes), float32 under autocast.
    """

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
        """Logits (B, n_classes) of the spikes (T, B, n_in)."""
        p = self.projection
        return projected_readout(spikes, p.weight, p.bias, self.beta(), self.d, self.reduce)
