"""The d-block kernel in constant sequential depth: decay Toeplitz matmuls on two levels of chunks.

Inside a block the no-reset membrane is a causal decay filter (docs/model.md §3 step 2),
``U_tau = sum_{j <= tau} beta^(tau - j) J_j``: a matmul with the per-neuron decay Toeplitz. A
block of at most ``SINGLE`` = 64 steps is one chunk (one (L, L) Toeplitz). A longer one would make
the Toeplitz too large (N L^2 values, 1.6 GB at L = 2048, N = 100), so it is cut into M chunks of
c steps (c about sqrt(L)) and the filter runs on two levels, as a chunked scan does (Mamba-2's
SSD), both of them matmuls:

- inside a chunk: ``u = J D`` with the (c, c) Toeplitz ``D[j, i] = beta^(i - j)`` (i >= j);
- between chunks: the local membranes at the chunk ends ``e_m = J_m D[:, c - 1]`` go through the
  (M, M) Toeplitz ``Q[m', m] = beta^(c (m - 1 - m'))`` (m > m'), which gives the membrane at the
  end of the previous chunk, ``E_{m-1} = sum_{m' < m} beta^(c (m - 1 - m')) e_m'``; it enters as
  ``beta E_{m-1}`` added to the chunk's first current before the in-chunk matmul, so that
  ``U[m, i] = u[m, i] + beta^(i + 1) E_{m-1}`` needs no pass over the membrane after it.

Memory for the matrices is N (c^2 + M^2), about 2 N L; every power comes from one cumulative
product (``decay_powers``), so beta = 0 and beta = 1 are exact. Spikes keep the first crossing of
each block: the step of the first ``U > 1`` is an ``argmax`` over the crossings (the first of the
maxima), and one comparison of the steps with it writes the time-major spikes. The backward pass
is written by hand (docs/model.md §3 step 5):

- straight-through first spike: ``dL/dC_j = sum_{tau >= j} (tau - j + 1) dL/dS_tau`` within the
  block: a matmul with the ramp ``H[j, tau] = tau - j + 1`` (tau >= j), the same for every neuron,
  so it reads the time-major gradient as it is (a cumulative sum would be two passes more, and
  CUDA refuses a float cumsum under deterministic algorithms);
- surrogate: ``dL/dU = dL/dC / (k |U - 1| + 1)^2``; its division writes the neuron-major layout;
- membrane: the adjoint ``a_j = sum_{tau >= j} beta^(tau - j) dL/dU_tau`` (= ``dL/dJ_j``), the
  same two levels with the transposed matrices (the carry ``beta F_{m+1}``, ``F`` the adjoint at
  a chunk start, enters at the chunk's last step); ``dL/dbeta = sum_tau a_tau U_{tau - 1}``, one
  batched dot product over the flattened steps.

So a feedforward layer, and the backward of a recurrent one, issue a fixed number of ops
whatever T and d. A recurrent layer (detached spikes) then loops over blocks, a fixed number of
ops each: it adds ``beta^tau R_k`` to block k's feedforward membrane, and which neurons fired
gives ``R_{k+1} = W m_k + b``; in the backward ``dL/dR_k`` is the adjoint at block k's first step.

Layout. The membrane matmuls are batched over neurons, so they work in a neuron-major layout
(N, K, B, P): K blocks, each padded with zeros to P = M c steps (P = L for one chunk). Padding
follows a block's last step, so the causal filter never lets it reach a real step; its spikes
are dropped. Moving the (T, B, N) current into that layout and the adjoint back are transposing
copies, one memory-bound op each: the price of a per-neuron Toeplitz. Counted at dispatch level
(``experiments/kernel_passes.py``), the neuron part of a feedforward layer's forward + backward
moves about 29 passes over the (T, B, N) current at the SHD shape (55 before this layout of the
work); on a CPU the loop kernel (``block_kernel``), which needs no copy, is faster per layer
(README, Speed), so ``kernel="auto"`` keeps it there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from dblock.functional.blocks.arithmetic import block_groups, decay_powers
from dblock.functional.precision import ieee_matmuls
from dblock.values import positive_int

_INDEX: dict[tuple, Tensor] = {}
SINGLE = 64  # blocks up to this long use one (L, L) Toeplitz (M = 1): no carry, no padding


def chunk_plan(lengths: list[int], chunk: int | None = None) -> tuple[int, int]:
    """(c, M): chunk length and chunks per block for blocks of ``lengths``.

    ``chunk=None`` takes ``c = L`` (one chunk) for a longest block L <= ``SINGLE`` steps, and
    ``c = ceil(sqrt(L))`` above, which keeps the two Toeplitz matrices about the same size; a
    larger ``chunk`` than L is cut to L.
    """
    longest = max(lengths)
    if chunk is None:
        c = longest if longest <= SINGLE else math.isqrt(longest - 1) + 1
    else:
        c = min(positive_int("chunk", chunk), longest)
    return c, -(-longest // c)


def _index(size: int, step: int, shift: int, device: torch.device) -> Tensor:
    """(size, size) index ``step * |i - j - shift|`` at row j, column i; made on ``device`` and
    cached per device."""
    key = (size, step, shift, str(device))
    if key not in _INDEX:
        pos = torch.arange(size, device=device)
        _INDEX[key] = (pos - pos[:, None] - shift).abs_().mul_(step)
    return _INDEX[key]


def _matrices(pw: Tensor, c: int, m: int) -> tuple[Tensor, Tensor | None]:
    """The in-chunk Toeplitz ``D`` (N, c, c) and the chunk-carry ``Q`` (N, M, M) (None if M = 1)
    from the powers ``pw`` (N, P + 1)."""
    inner = pw[:, _index(c, 1, 0, pw.device)].triu()
    if m == 1:
        return inner, None
    return inner, pw[:, _index(m, c, 1, pw.device)].triu(1)


def _ramp(length: int, like: Tensor) -> Tensor:
    """(L, L) ``H[j, tau] = tau - j + 1`` for ``tau >= j``, else 0, of ``like``'s dtype and
    device: ``H g`` is the straight-through ``dL/dC`` of ``dL/dS`` ``g`` within a block."""
    key = ("ramp", length, like.dtype, str(like.device))
    if key not in _INDEX:
        pos = torch.arange(length, dtype=like.dtype, device=like.device)
        _INDEX[key] = (pos - pos[:, None] + 1).triu_()
    return _INDEX[key]


def _neuron_major(x: Tensor, start: int, n_blocks: int, length: int) -> Tensor:
    """Steps ``[start, start + K L)`` of a (T, B, N) tensor of any strides (a gradient may be
    expanded) as an (N, K, B, L) view: one op."""
    s_t, s_b, s_n = x.stride()
    return x.as_strided(
        (x.shape[2], n_blocks, x.shape[1], length),
        (s_n, length * s_t, s_b, s_t),
        x.storage_offset() + start * s_t,
    )


def _to_work(x: Tensor, lengths: list[int], width: int) -> Tensor:
    """(T, B, N) -> (N, K, B, P): blocks side by side, each zero-padded to ``width`` = P steps
    (only the padding is zeroed)."""
    _, batch, n = x.shape
    out = x.new_empty(n, len(lengths), batch, width)
    k = 0
    for start, n_blocks, length in block_groups(lengths):
        out[:, k : k + n_blocks, :, :length].copy_(_neuron_major(x, start, n_blocks, length))
        if length < width:
            out[:, k : k + n_blocks, :, length:].zero_()
        k += n_blocks
    return out


def _from_work(w: Tensor, lengths: list[int], dtype: torch.dtype) -> Tensor:
    """(N, K, B, P) -> (T, B, N) of ``dtype``: the real steps of every block, padding dropped."""
    n, _, batch, _ = w.shape
    out = w.new_empty(sum(lengths), batch, n, dtype=dtype)
    k = 0
    for start, n_blocks, length in block_groups(lengths):
        _neuron_major(out, start, n_blocks, length).copy_(w[:, k : k + n_blocks, :, :length])
        k += n_blocks
    return out


def _filter(j: Tensor, pw: Tensor, inner: Tensor, carry: Tensor | None) -> Tensor:
    """Membrane (N, K, B, P) of the currents ``j`` (N, K, B, P), restarted at each block start.
    With chunks, ``j`` is changed in place: the membrane carried in from the previous chunk
    enters as ``beta E_{m-1}`` added to the chunk's first current, before the in-chunk filter
    (no pass over the membrane after it)."""
    n, k, b, p = j.shape
    c = inner.shape[-1]
    rows = j.view(n, -1, c)
    if carry is not None:
        ends = torch.bmm(rows, inner[:, :, c - 1 :])  # (N, K B M, 1): local chunk ends e_m
        prev = torch.bmm(ends.view(n, k * b, p // c), carry)  # (N, K B, M): E_{m-1}
        j.view(n, k * b, p // c, c)[..., 0].addcmul_(prev, pw[:, 1:2].unsqueeze(-1))
    return torch.bmm(rows, inner).view(n, k, b, p)


def _adjoint(g: Tensor, pw: Tensor, inner: Tensor, carry: Tensor | None) -> Tensor:
    """The adjoint (N, K, B, P) of ``_filter`` applied to ``g`` (N, K, B, P): the reverse filter
    ``a_j = sum_{tau >= j} beta^(tau - j) g_tau`` within each block; ``g`` is changed in place
    (the carry from the next chunk, ``beta F_{m+1}``, enters at a chunk's last step)."""
    n, k, b, p = g.shape
    c = inner.shape[-1]
    rows = g.view(n, -1, c)
    if carry is not None:
        starts = torch.bmm(rows, inner[:, :1, :].transpose(1, 2))  # (N, K B M, 1): f_m
        after = torch.bmm(starts.view(n, k * b, p // c), carry.transpose(1, 2))  # F_{m+1}
        g.view(n, k * b, p // c, c)[..., c - 1].addcmul_(after, pw[:, 1:2].unsqueeze(-1))
    return torch.bmm(rows, inner.transpose(1, 2)).view(n, k, b, p)


def _recurrent(
    u: Tensor, pw: Tensor, weight: Tensor, bias: Tensor | None, lengths: list[int]
) -> tuple[Tensor, Tensor]:
    """Add ``beta^tau R_k`` to each block of ``u`` (N, K, B, P) in place, block by block, with
    ``R_{k+1} = W m_k + b``. Returns which neurons fired, (K, N, B) as 0/1 of ``u``'s dtype,
    and the step of each block's first crossing, (N, K, B) (``_first_steps``)."""
    n, k_blocks, batch, p = u.shape
    powers = pw[:, :p].unsqueeze(1)  # (N, 1, P)
    fired = u.new_empty(k_blocks, n, batch)
    first = u.new_empty(n, k_blocks, batch, dtype=torch.long)
    recurrent = u.new_empty(n, batch, 1)  # W m_{k-1}, (N, B, 1)
    for k, length in enumerate(lengths):
        block = u[:, k]  # (N, B, P)
        if k > 0:
            block.addcmul_(recurrent, powers)
        steps = block if length == p else block[..., :length]
        crossed = _first_steps(steps, first[:, k])
        torch.lt(crossed, length, out=fired[k])
        if k + 1 < k_blocks and bias is None:
            torch.mm(weight, fired[k], out=recurrent.view(n, batch))
        elif k + 1 < k_blocks:  # R_{k+1} with its b: no pass of its own over the membrane
            torch.addmm(bias.view(n, 1), weight, fired[k], out=recurrent.view(n, batch))
    return fired, first


def _first_steps(u: Tensor, out: Tensor | None = None) -> Tensor:
    """The step of the first crossing ``U > 1`` along the last dimension of ``u``, or its length
    where there is none: (N, K, B) of the (N, K, B, L) ``u`` (int64)."""
    crossed = torch.gt(u, 1.0, out=torch.empty(u.shape, dtype=torch.uint8, device=u.device))
    first = torch.argmax(crossed, -1, out=out)  # the first of the maxima: the first crossing
    none = (first == 0).logical_and_(crossed[..., 0] == 0)  # all 0: argmax gives 0
    return first.masked_fill_(none, u.shape[-1])


def _spikes(first: Tensor, lengths: list[int], dtype: torch.dtype) -> Tensor:
    """Spikes (T, B, N) of ``dtype``: 1 at each block's first crossing ``first`` (N, K, B), a
    step >= the block's length meaning none; written in one comparison per group of blocks."""
    n, _, batch = first.shape
    out = torch.empty(sum(lengths), batch, n, dtype=dtype, device=first.device)
    k = 0
    for start, n_blocks, length in block_groups(lengths):
        steps = torch.arange(length, device=first.device).view(1, length, 1, 1)
        at = first[:, k : k + n_blocks].permute(1, 2, 0).unsqueeze(1)  # (K, 1, B, N)
        view = out[start : start + n_blocks * length].view(n_blocks, length, batch, n)
        torch.eq(steps, at, out=view)
        k += n_blocks
    return out


def _surrogate_grad(g: Tensor, u: Tensor, lengths: list[int], scale: float) -> Tensor:
    """``dL/dU`` (N, K, B, P) from ``dL/dS`` ``g`` (T, B, N) and the membrane ``u``: the
    straight-through first spike ``dL/dC = H g`` as a matmul over the time-major gradient with
    the ramp ``H`` (the same for every neuron; no cumulative sum, which CUDA refuses under
    deterministic algorithms), then the surrogate, whose division also moves ``dL/dC`` into the
    neuron-major layout (padding 0)."""
    n, _, batch, width = u.shape
    # 1 / (k |U - 1| + 1)^2 = (1 / k^2) / (|U - 1| + 1 / k)^2: the 1 / k^2 rides on H
    denom = torch.sub(u, 1.0).abs_().add_(1.0 / scale).square_()
    out = torch.empty_like(u)
    g = g.contiguous()
    k = 0
    for start, n_blocks, length in block_groups(lengths):
        ramp = _ramp(length, g) / scale**2
        steps = g[start : start + n_blocks * length].view(n_blocks, length, batch * n)
        run = torch.matmul(ramp, steps).view(n_blocks, length, batch, n)  # (K, L, B, N)
        target = out[:, k : k + n_blocks, :, :length]
        torch.div(run.permute(3, 0, 2, 1), denom[:, k : k + n_blocks, :, :length], out=target)
        if length < width:
            out[:, k : k + n_blocks, :, length:].zero_()
        k += n_blocks
    return out


def _beta_grad(a: Tensor, u: Tensor) -> Tensor:
    """``dL/dbeta = sum_tau a_tau U_{tau - 1}`` within blocks, (N,), from the adjoint ``a`` and
    the membrane ``u`` (N, K, B, P): one batched dot product over the flattened steps, less the
    pairs that straddle two rows (a row's first step with the previous row's last)."""
    n = a.shape[0]
    flat_a, flat_u = a.view(n, 1, -1), u.view(n, -1, 1)
    dot = torch.bmm(flat_a[..., 1:], flat_u[:, :-1]).view(n)
    rows_a, rows_u = a.view(n, -1, a.shape[-1]), u.view(n, -1, u.shape[-1])
    straddle = torch.bmm(rows_a[:, 1:, :1].transpose(1, 2), rows_u[:, :-1, -1:]).view(n)
    return dot - straddle


@contextmanager
def _float32(device_type: str) -> Iterator[None]:
    """Autocast off and IEEE float32 matmuls: the Toeplitz sums are the membrane, so TF32 or bf16
    would move spikes (``precision.ieee_matmuls``)."""
    with torch.autocast(device_type, enabled=False), ieee_matmuls():
        yield


class ChunkedFunction(torch.autograd.Function):
    """d-block spikes of a feedforward layer, or of a recurrent one with detached spikes."""

    @staticmethod
    def forward(ctx, current, beta, weight, bias, lengths, scale, chunk):  # noqa: D102
        with _float32(current.device.type):
            c, m = chunk_plan(lengths, chunk)
            pw = decay_powers(beta, m * c + 1).t().contiguous()  # (N, P + 1)
            inner, carry = _matrices(pw, c, m)
            u = _filter(_to_work(current, lengths, m * c), pw, inner, carry)
            if weight is None:
                fired, first = None, _first_steps(u)
            else:
                fired, first = _recurrent(u, pw, weight, bias, lengths)
            out = _spikes(first, lengths, current.dtype)
        ctx.save_for_backward(u, pw, inner, carry, fired)
        ctx.lengths, ctx.scale = lengths, scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        u, pw, inner, carry, fired = ctx.saved_tensors
        with _float32(grad.device.type):
            g = _surrogate_grad(grad.to(u.dtype), u, ctx.lengths, ctx.scale)
            a = _adjoint(g, pw, inner, carry)
            g_current = _from_work(a, ctx.lengths, grad.dtype)
            g_beta = _beta_grad(a, u)
            g_weight = g_bias = None
            if fired is not None and fired.shape[0] > 1:
                g_rec = a[:, 1:, :, 0].reshape(u.shape[0], -1)  # dL/dR_k, k >= 1: (N, (K-1) B)
                if ctx.needs_input_grad[2]:
                    g_weight = g_rec @ fired[:-1].permute(1, 0, 2).reshape(u.shape[0], -1).t()
                if ctx.needs_input_grad[3]:
                    g_bias = g_rec.sum(1)
        return g_current, g_beta, g_weight, g_bias, None, None, None


def chunked_kernel(
    current: Tensor,
    beta: Tensor,
    lengths: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float = 10.0,
    chunk: int | None = None,
) -> Tensor:
    """Spikes (T, B, N) of a d-block layer from its time-major current (T, B, N); ``chunk`` is
    the in-chunk Toeplitz size c (None: about sqrt of the block length)."""
    return ChunkedFunction.apply(current, beta, weight, bias, lengths, scale, chunk)
