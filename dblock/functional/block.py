"""The d-block neuron (SPEC §3): membrane without reset inside a block, first spike only.

All blocks of a feedforward layer are computed at once; a recurrent layer loops over blocks
(never over time steps). Tensors are time-major, (T, B, N), at the interface and inside. The
kernel (``block_kernel``) is linear in T, forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.block_kernel import dblock_kernel
from dblock.functional.blocks import block_lengths


def _attached(
    current: Tensor,
    beta: Tensor,
    lengths: list[int],
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """Recurrent spikes that carry gradient: loop over blocks, each block one kernel call, the
    block's spikes feeding the first step of the next block through autograd. (T, B, N)."""
    out = []
    start = 0
    recurrent = None
    for length in lengths:
        block = current[start : start + length]
        if recurrent is not None:
            block = torch.cat([(block[0] + recurrent).unsqueeze(0), block[1:]])
        spikes = dblock_kernel(block, beta, [length], scale=scale)  # (L, B, N)
        out.append(spikes)
        fired = spikes.amax(dim=0)  # (B, N)
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
        current: input current ``W x + b``, time-major (T, B, N).
        beta: per-neuron decay (N,), used as given (callers clamp).
        d: number of blocks, ``1 <= d <= T``.
        recurrent_weight: (N, N) or None for a feedforward layer.
        recurrent_bias: (N,) or None.
        detach_recurrent: stop the gradient through the spikes fed back between blocks.
        scale: slope ``k`` of the fast-sigmoid surrogate.

    Returns:
        spikes (T, B, N) as 0/1 floats carrying the straight-through gradient.
    """
    lengths = block_lengths(current.shape[0], d)
    if recurrent_weight is not None and not detach_recurrent:
        return _attached(current, beta, lengths, recurrent_weight, recurrent_bias, scale)
    return dblock_kernel(current, beta, lengths, recurrent_weight, recurrent_bias, scale)
