"""The d-block kernel in constant sequential depth: decay Toeplitz matmuls on two levels of chunks.

Inside a block the no-reset membrane is a causal decay filter (SPEC §3 step 2),
``U_tau = sum_{j <= tau} beta^(tau - j) J_j``: a matmul with the per-neuron decay Toeplitz. The
whole Toeplitz of a block of L steps holds N L^2 values (1.6 GB at L = 2048, N = 100), so each
block is cut into M chunks of c steps (c about sqrt(L)) and the filter runs on two levels, as a
chunked scan does (Mamba-2's SSD), both of them matmuls:

- inside a chunk: ``u = J D`` with the (c, c) Toeplitz ``D[j, i] = beta^(i - j)`` (i >= j);
- between chunks: the local membranes at the chunk ends ``e_m = u[m, c - 1]`` go through the
  (M, M) Toeplitz ``Q[m', m] = beta^(c (m - 1 - m'))`` (m > m'), which gives the membrane at the
  end of the previous chunk, ``E_{m-1} = sum_{m' < m} beta^(c (m - 1 - m')) e_m'``; then
  ``U[m, i] = u[m, i] + beta^(i + 1) E_{m-1}``.

Memory for the matrices is N (c^2 + M^2), about 2 N L; every power comes from one cumulative
product (``decay_powers``), so beta = 0 and beta = 1 are exact. Spikes keep the first crossing of
each block: ``C = [U > 1]``, ``S = C [cumsum(C) == 1]``. The backward pass is written by hand
(SPEC §3 step 5):

- straight-through first spike: ``dL/dC_j = sum_{tau >= j} (tau - j + 1) dL/dS_tau`` within the
  block, two reverse cumulative sums;
- surrogate: ``dL/dU = dL/dC / (k |U - 1| + 1)^2``;
- membrane: the adjoint ``a_j = sum_{tau >= j} beta^(tau - j) dL/dU_tau`` (= ``dL/dJ_j``), the
  same two levels with the transposed matrices (the carry now runs from later chunks back to
  ``a[m, j] += beta^(c - j) F_{m+1}``, ``F`` the adjoint at a chunk start);
  ``dL/dbeta = sum_tau a_tau U_{tau - 1}``.

So a feedforward layer, and the backward of a recurrent one, issue a fixed number of ops
whatever T and d. A recurrent layer (detached spikes) then loops over blocks, a fixed number of
ops each: it adds ``beta^tau R_k`` to block k's feedforward membrane, and which neurons fired
gives ``R_{k+1} = W m_k + b``; in the backward ``dL/dR_k`` is the adjoint at block k's first step.

Layout. The matmuls are batched over neurons, so the kernel works in a neuron-major layout
(N, K, B, P): K blocks, each padded with zeros to P = M c steps (the remainder block too, so all
blocks run at once). Padding follows a block's last step, so the causal filter never lets it
reach a real step; its spikes are dropped. Moving the (T, B, N) current into that layout and the
spikes back (and the gradients, in the backward) are transposing copies, one memory-bound op
each: the price of a per-neuron Toeplitz, which cannot be a matmul over the time-major layout
without one. On a GPU, where the number of launches sets the time of small steps, that is the
better trade (not yet measured on one); on a CPU the loop kernel (``block_kernel``), which needs
no copy, is 1.3-1.7x faster per layer (README, Speed), so ``kernel="auto"`` keeps it there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from dblock.functional.block_kernel import block_groups, decay_powers
from dblock.values import positive_int

_INDEX: dict[tuple, Tensor] = {}


def chunk_plan(lengths: list[int], chunk: int | None = None) -> tuple[int, int]:
    """(c, M): chunk length and chunks per block for blocks of ``lengths``.

    ``chunk=None`` takes ``c = ceil(sqrt(L))`` for the longest block L, which keeps the two
    Toeplitz matrices about the same size; a larger ``chunk`` than L is cut to L.
    """
    longest = max(lengths)
    if chunk is None:
        c = math.isqrt(longest - 1) + 1
    else:
        c = min(positive_int("chunk", chunk), longest)
    return c, -(-longest // c)


def _toeplitz_index(size: int, step: int, shift: int, device: torch.device) -> Tensor:
    """(size, size) index ``step * |i - j - shift|`` at row j, column i; cached per device."""
    key = (size, step, shift, str(device))
    if key not in _INDEX:
        pos = torch.arange(size)
        _INDEX[key] = ((pos - pos[:, None] - shift).abs() * step).to(device)
    return _INDEX[key]


def _matrices(pw: Tensor, c: int, m: int) -> tuple[Tensor, Tensor | None]:
    """The in-chunk Toeplitz ``D`` (N, c, c) and the chunk-carry ``Q`` (N, M, M) (None if M = 1)
    from the powers ``pw`` (N, P + 1)."""
    inner = pw[:, _toeplitz_index(c, 1, 0, pw.device)].triu()
    if m == 1:
        return inner, None
    return inner, pw[:, _toeplitz_index(m, c, 1, pw.device)].triu(1)


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
    """(T, B, N) -> (N, K, B, P): blocks side by side, each zero-padded to ``width`` = P steps."""
    _, batch, n = x.shape
    out = x.new_zeros(n, len(lengths), batch, width)
    k = 0
    for start, n_blocks, length in block_groups(lengths):
        out[:, k : k + n_blocks, :, :length].copy_(_neuron_major(x, start, n_blocks, length))
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
    """Membrane (N, K, B, P) of the currents ``j`` (N, K, B, P), restarted at each block start."""
    n, k, b, p = j.shape
    c = inner.shape[-1]
    u = torch.bmm(j.view(n, -1, c), inner)  # (N, K B M, c): in-chunk filter
    if carry is not None:
        u4 = u.view(n, k * b, p // c, c)
        prev = torch.bmm(u4[..., c - 1].contiguous(), carry)  # (N, K B, M): E_{m-1}
        u4.addcmul_(prev.unsqueeze(-1), pw[:, 1 : c + 1].view(n, 1, 1, c))
    return u.view(n, k, b, p)


def _adjoint(g: Tensor, pw: Tensor, inner: Tensor, carry: Tensor | None) -> Tensor:
    """The adjoint (N, K, B, P) of ``_filter`` applied to ``g`` (N, K, B, P): the reverse filter
    ``a_j = sum_{tau >= j} beta^(tau - j) g_tau`` within each block."""
    n, k, b, p = g.shape
    c = inner.shape[-1]
    a = torch.bmm(g.view(n, -1, c), inner.transpose(1, 2))
    if carry is not None:
        a4 = a.view(n, k * b, p // c, c)
        after = torch.bmm(a4[..., 0].contiguous(), carry.transpose(1, 2))  # (N, K B, M): F_{m+1}
        a4.addcmul_(after.unsqueeze(-1), pw[:, 1 : c + 1].flip(-1).view(n, 1, 1, c))
    return a.view(n, k, b, p)


def _recurrent(
    u: Tensor, pw: Tensor, weight: Tensor, bias: Tensor | None, lengths: list[int]
) -> Tensor:
    """Add ``beta^tau R_k`` to each block of ``u`` (N, K, B, P) in place, block by block, with
    ``R_{k+1} = W m_k + b``. Returns which neurons fired, (K, N, B) as 0/1 of ``u``'s dtype."""
    n, k_blocks, batch, p = u.shape
    powers = pw[:, :p].unsqueeze(1)  # (N, 1, P)
    if bias is not None and k_blocks > 1:  # the b of every R_k, k >= 1, in one op
        u[:, 1:].addcmul_(bias.view(n, 1, 1, 1), powers.unsqueeze(1))
    fired = u.new_empty(k_blocks, n, batch)
    recurrent = u.new_empty(n, batch, 1)  # W m_{k-1}, (N, B, 1)
    for k, length in enumerate(lengths):
        block = u[:, k]  # (N, B, P)
        if k > 0:
            block.addcmul_(recurrent, powers)
        steps = block if length == p else block[..., :length]
        torch.amax(steps, -1, out=fired[k]).gt_(1.0)
        if k + 1 < k_blocks:
            torch.mm(weight, fired[k], out=recurrent.view(n, batch))
    return fired


def _first_spikes(u: Tensor) -> Tensor:
    """The first crossing ``U > 1`` in each block of ``u`` (N, K, B, P), bool."""
    candidates = u > 1.0
    return candidates.logical_and_(candidates.cumsum(-1, dtype=torch.int32) == 1)


def _candidate_grad(g: Tensor, u: Tensor, scale: float) -> Tensor:
    """``dL/dU`` (N, K, B, P) from ``dL/dS`` ``g`` and the membrane ``u`` (both (N, K, B, P)):
    the straight-through first spike, then the surrogate."""
    run = g.flip(-1).cumsum_(-1).cumsum_(-1).flip(-1)  # sum_{tau >= j} (tau - j + 1) g_tau
    denom = (u - 1.0).abs_().mul_(scale).add_(1.0).square_()
    return run.div_(denom)


@contextmanager
def _float32(device_type: str) -> Iterator[None]:
    """Autocast off and full-precision float32 matmuls: the Toeplitz sums are the membrane, so
    TF32 (``torch.set_float32_matmul_precision("high")``) or bf16 would move spikes."""
    old = torch.get_float32_matmul_precision()
    with torch.autocast(device_type, enabled=False):
        if old == "highest":
            yield
            return
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


class ChunkedFunction(torch.autograd.Function):
    """d-block spikes of a feedforward layer, or of a recurrent one with detached spikes."""

    @staticmethod
    def forward(ctx, current, beta, weight, bias, lengths, scale, chunk):  # noqa: D102
        with _float32(current.device.type):
            c, m = chunk_plan(lengths, chunk)
            pw = decay_powers(beta, m * c + 1).t().contiguous()  # (N, P + 1)
            inner, carry = _matrices(pw, c, m)
            u = _filter(_to_work(current, lengths, m * c), pw, inner, carry)
            fired = None if weight is None else _recurrent(u, pw, weight, bias, lengths)
            out = _from_work(_first_spikes(u), lengths, current.dtype)
        ctx.save_for_backward(u, pw, inner, carry, fired)
        ctx.lengths, ctx.scale = lengths, scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        u, pw, inner, carry, fired = ctx.saved_tensors
        with _float32(grad.device.type):
            g = _candidate_grad(_to_work(grad, ctx.lengths, u.shape[-1]), u, ctx.scale)
            a = _adjoint(g, pw, inner, carry)
            g_current = _from_work(a, ctx.lengths, grad.dtype)
            g_beta = (a[..., 1:] * u[..., :-1]).sum((1, 2, 3))
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
