"""The d-block neuron (SPEC §3): membrane without reset inside a block, first spike only.

All blocks of a feedforward layer are computed at once; a recurrent layer loops over blocks
(never over time steps). Tensors are (B, N, T) at the interface and time-major inside.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.blocks import block_lengths
from dblock.functional.surrogate import fast_sigmoid


def decay_powers(beta: Tensor, length: int) -> Tensor:
    """``beta ** k`` for ``k = 0 .. length-1``, shape (length, N); safe at ``beta = 0``."""
    ones = torch.ones_like(beta).unsqueeze(0)
    if length == 1:
        return ones
    return torch.cat([ones, torch.cumprod(beta.expand(length - 1, -1), dim=0)])


def decay_filter(beta: Tensor, length: int) -> Tensor:
    """Causal decay matrix ``K[n, t, j] = beta_n ** (t - j)`` for ``j <= t`` else 0, (N, L, L)."""
    powers = decay_powers(beta, length)  # (L, N)
    steps = torch.arange(length, device=beta.device)
    lag = steps[:, None] - steps[None, :]  # (t, j)
    kernel = powers[lag.clamp(min=0)]  # (t, j, N)
    kernel = kernel * (lag >= 0).unsqueeze(-1).to(beta.dtype)
    return kernel.permute(2, 0, 1)


def first_spike(candidates: Tensor, dim: int) -> Tensor:
    """Keep the first candidate spike along ``dim`` with the straight-through rule (SPEC §3.4-5).

    ``z = cumsum(cumsum(C))``; the output is ``z - sg(z * [z != 1])``: 1 at the first
    crossing only, with gradient identity in ``z``.
    """
    z = candidates.cumsum(dim).cumsum(dim)
    return z - (z * (z != 1)).detach()


def block_spikes(current: Tensor, beta: Tensor, scale: float) -> Tensor:
    """Spikes of K independent blocks at once. ``current`` (K, L, B, N) -> spikes (K, L, B, N)."""
    n_blocks, length, batch, n = current.shape
    kernel = decay_filter(beta, length)  # (N, L, L)
    flat = current.permute(3, 1, 0, 2).reshape(n, length, n_blocks * batch)
    membrane = torch.bmm(kernel, flat)  # (N, L, K*B)
    membrane = membrane.reshape(n, length, n_blocks, batch).permute(2, 1, 3, 0)
    return first_spike(fast_sigmoid(membrane - 1.0, scale), dim=1)


def _feedforward(current: Tensor, beta: Tensor, lengths: list[int], scale: float) -> Tensor:
    """All blocks at once; ``current`` (T, B, N) time-major -> spikes (T, B, N)."""
    length = lengths[0]
    n_full = len(lengths) - (lengths[-1] != length)  # a remainder of length L is a full block
    split = n_full * length
    full = current[:split].reshape(n_full, length, *current.shape[1:])
    out = [block_spikes(full, beta, scale).reshape(split, *current.shape[1:])]
    if split < current.shape[0]:
        out.append(block_spikes(current[split:].unsqueeze(0), beta, scale)[0])
    return torch.cat(out) if len(out) > 1 else out[0]


def _recurrent(
    current: Tensor,
    beta: Tensor,
    lengths: list[int],
    weight: Tensor,
    bias: Tensor | None,
    detach: bool,
    scale: float,
) -> Tensor:
    """Loop over blocks; a block's spikes feed the first step of the next block."""
    out = []
    start = 0
    recurrent = None
    for length in lengths:
        block = current[start : start + length]
        if recurrent is not None:
            block = torch.cat([(block[0] + recurrent).unsqueeze(0), block[1:]])
        spikes = block_spikes(block.unsqueeze(0), beta, scale)[0]  # (L, B, N)
        out.append(spikes)
        fired = spikes.amax(dim=0)  # (B, N)
        if detach:
            fired = fired.detach()
        recurrent = fired @ weight.t()
        if bias is not None:
            recurrent = recurrent + bias
        start += length
    return torch.cat(out)


def dblock_neurons(
    current: Tensor,
    beta: Tensor,
    d: int,
    recurrent_weight: Tensor | None = None,
    recurrent_bias: Tensor | None = None,
    detach_recurrent: bool = True,
    scale: float = 10.0,
) -> Tensor:
    """d-block spikes (SPEC §3).

    Args:
        current: input current ``W x + b``, (B, N, T).
        beta: per-neuron decay (N,), used as given (callers clamp).
        d: number of blocks, ``1 <= d <= T``.
        recurrent_weight: (N, N) or None for a feedforward layer.
        recurrent_bias: (N,) or None.
        detach_recurrent: stop the gradient through the spikes fed back between blocks.
        scale: slope ``k`` of the fast-sigmoid surrogate.

    Returns:
        spikes (B, N, T) as 0/1 floats carrying the straight-through gradient.
    """
    lengths = block_lengths(current.shape[-1], d)
    time_major = current.permute(2, 0, 1)  # (T, B, N)
    if recurrent_weight is None:
        spikes = _feedforward(time_major, beta, lengths, scale)
    else:
        spikes = _recurrent(
            time_major, beta, lengths, recurrent_weight, recurrent_bias, detach_recurrent, scale
        )
    return spikes.permute(1, 2, 0)
