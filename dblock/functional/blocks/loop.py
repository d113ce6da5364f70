"""The d-block kernel as one autograd Function whose forward and backward are both linear in T.

Inside a block the no-reset membrane is a linear recurrence restarted at the block start, so it
is run step by step over the block (vectorised over all blocks of equal length, the batch and
the neurons): the Python loop has ``L`` iterations, not ``T``, and the work is ``O(T)``, not the
``O(T L)`` of a Toeplitz matrix. Spikes keep the first crossing of each block. The backward pass
is written by hand (docs/model.md §3 step 5):

- straight-through first spike: ``dL/dC_j = sum_{tau >= j} (tau - j + 1) dL/dS_tau`` within the
  block, i.e. two reverse running sums;
- surrogate: ``dL/dU = dL/dC / (k |U - 1| + 1)^2``;
- membrane: the adjoint ``a_tau = dL/dU_tau + beta a_{tau + 1}`` (reverse recurrence), which is
  ``dL/dJ_tau``; ``dL/dbeta = sum a_tau U_{tau - 1}``.

Only the membrane ``U`` (and, in a recurrent layer, which neurons fired in each block) is kept for
the backward pass. A recurrent layer with detached spikes runs in the same Function: the
feedforward membrane of every block is computed at once, then a loop over blocks adds
``beta^tau R_k`` (the recurrent current entering at the block's first step) and decides which
neurons fire, which gives ``R_{k+1}``. Tensors are time-major (T, B, N) here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.blocks.arithmetic import block_groups, decay_powers


def _blocks(x: Tensor, start: int, n_blocks: int, length: int) -> Tensor:
    """Steps ``[start, start + K * L)`` of a (T, B, N) tensor as a (K, L, B, N) view."""
    return x[start : start + n_blocks * length].unflatten(0, (n_blocks, length))


def _membrane(j: Tensor, u: Tensor, beta: Tensor) -> None:
    """Into ``u`` (K, L, B, N): the no-reset membrane of the currents ``j``, restarted at each
    block start. One step per iteration over all K blocks at once."""
    u[:, 0].copy_(j[:, 0])
    for tau in range(1, u.shape[1]):
        torch.addcmul(j[:, tau], u[:, tau - 1], beta, out=u[:, tau])


def _first_spikes(u: Tensor, out: Tensor, j: Tensor | None = None, beta: Tensor | None = None):
    """Write the first crossing ``U > 1`` in each block of ``u`` (K, L, B, N) into ``out`` as
    0/1 and return which neurons fired, (K, B, N) bool. With ``j`` and ``beta`` the membrane is
    computed into ``u`` in the same pass (the step is still hot in cache)."""
    length = u.shape[1]
    quiet = torch.ones_like(u[:, 0])  # 1 until the neuron's first spike in the block
    for tau in range(length):
        if j is not None:
            if tau == 0:
                u[:, 0].copy_(j[:, 0])
            else:
                torch.addcmul(j[:, tau], u[:, tau - 1], beta, out=u[:, tau])
        spikes = torch.gt(u[:, tau], 1.0, out=out[:, tau])
        spikes.mul_(quiet)  # the first crossing only
        quiet.sub_(spikes)
    return quiet == 0


def _adjoint(grad: Tensor, u: Tensor, beta: Tensor, scale: float, out: Tensor) -> Tensor:
    """Into ``out`` (K, L, B, N): ``dL/dJ`` from ``dL/dS`` (``grad``) and the membrane ``u``.

    Returns the per-element terms of ``dL/dbeta`` summed over the block steps, (K, B, N).
    """
    length = u.shape[1]
    # 1 / (k |x| + 1)^2 = (1 / k^2) / (|x| + 1 / k)^2: the 1 / k^2 rides on the running sums
    run = torch.zeros_like(u[:, 0])  # sum_{tau >= j} dL/dS_tau / k^2
    acc = torch.zeros_like(run)  # sum_{tau >= j} (tau - j + 1) dL/dS_tau / k^2 = dL/dC_j / k^2
    denom = torch.empty_like(run)
    g_beta = torch.zeros_like(run)
    for tau in range(length - 1, -1, -1):
        run.add_(grad[:, tau], alpha=1.0 / scale**2)
        acc.add_(run)
        torch.sub(u[:, tau], 1.0, out=denom).abs_().add_(1.0 / scale)
        denom.mul_(denom)
        torch.div(acc, denom, out=out[:, tau])
        if tau < length - 1:
            out[:, tau].addcmul_(out[:, tau + 1], beta)
        if tau > 0:
            g_beta.addcmul_(out[:, tau], u[:, tau - 1])
    return g_beta


class DBlockFunction(torch.autograd.Function):
    """d-block spikes of a feedforward layer, or of a recurrent one with detached spikes."""

    @staticmethod
    def forward(ctx, current, beta, weight, bias, lengths, scale):  # noqa: D102
        u = torch.empty(current.shape, dtype=current.dtype, device=current.device)  # (T, B, N)
        out = torch.empty_like(u)
        groups = block_groups(lengths)
        fired = None
        if weight is None:
            for group in groups:
                j = _blocks(current, *group)
                _first_spikes(_blocks(u, *group), _blocks(out, *group), j, beta)
        else:
            for group in groups:
                _membrane(_blocks(current, *group), _blocks(u, *group), beta)
            fired = _recurrent_forward(u, beta, weight, bias, lengths)
            for group in groups:
                _first_spikes(_blocks(u, *group), _blocks(out, *group))
        ctx.save_for_backward(u, beta, fired)
        ctx.lengths, ctx.scale = lengths, scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        u, beta, fired = ctx.saved_tensors
        g_current = torch.empty_like(u)
        g_beta = torch.zeros_like(beta)
        starts = []
        for group in block_groups(ctx.lengths):
            adj = _blocks(g_current, *group)
            terms = _adjoint(_blocks(grad, *group), _blocks(u, *group), beta, ctx.scale, adj)
            g_beta += terms.flatten(0, 1).sum(0)
            starts.append(adj[:, 0])
        g_weight = g_bias = None
        if fired is not None and fired.shape[0] > 1:
            g_rec = torch.cat(starts)[1:].flatten(0, 1)  # dL/dR_k for k >= 1, (K-1)*B x N
            if ctx.needs_input_grad[2]:
                g_weight = g_rec.t() @ fired[:-1].flatten(0, 1).to(g_rec.dtype)
            if ctx.needs_input_grad[3]:
                g_bias = g_rec.sum(0)
        return g_current, g_beta, g_weight, g_bias, None, None


def _recurrent_forward(
    u: Tensor, beta: Tensor, weight: Tensor, bias: Tensor | None, lengths: list[int]
) -> Tensor:
    """Add each block's recurrent current ``beta^tau R_k`` to the feedforward membrane ``u``
    (T, B, N) in place, block by block. Returns which neurons fired, (n_blocks, B, N) bool."""
    fired = []
    recurrent = None
    start = 0
    powers = {}
    for length in lengths:
        u_block = u[start : start + length]
        if recurrent is not None:
            if length not in powers:
                powers[length] = decay_powers(beta, length).unsqueeze(1)  # (L, 1, N)
            u_block.addcmul_(powers[length], recurrent)
        fired.append(u_block.amax(0) > 1.0)
        spikes = fired[-1].to(u.dtype)
        recurrent = spikes @ weight.t() if bias is None else torch.addmm(bias, spikes, weight.t())
        start += length
    return torch.stack(fired)


def dblock_kernel(
    current: Tensor,
    beta: Tensor,
    lengths: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float = 10.0,
) -> Tensor:
    """Spikes (T, B, N) of a d-block layer from its time-major current (T, B, N)."""
    return DBlockFunction.apply(current, beta, weight, bias, lengths, scale)
