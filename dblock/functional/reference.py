"""Plain step-by-step loops written straight from docs/model.md §2-4: the ground truth for tests.

No vectorisation and no tricks; slow on purpose. Autograd runs through these loops, so their
gradients are the reference gradients too. Tensors are time-major, (T, B, N), as in the fast
functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.blocks.arithmetic import block_lengths
from dblock.functional.surrogate import fast_sigmoid


def dblock_neurons(
    current: Tensor,
    beta: Tensor,
    d: int,
    recurrent_weight: Tensor | None = None,
    recurrent_bias: Tensor | None = None,
    detach_recurrent: bool = True,
    scale: float = 10.0,
) -> Tensor:
    """docs/model.md §3 simulated one step at a time. (T, B, N) -> (T, B, N).

    Args:
        current: input current, time-major (T, B, N).
        beta: per-neuron decay (N,).
        d: number of blocks, ``1 <= d <= T``.
        recurrent_weight: (N, N) or None (feedforward).
        recurrent_bias: (N,) or None.
        detach_recurrent: stop the gradient through the spikes fed back between blocks.
        scale: slope of the fast-sigmoid surrogate.

    Returns:
        spikes (T, B, N).
    """
    t_len, batch, n = current.shape
    spikes = []
    start = 0
    recurrent = torch.zeros(batch, n, dtype=current.dtype, device=current.device)
    for length in block_lengths(t_len, d):
        u = torch.zeros_like(recurrent)
        c_sum = torch.zeros_like(recurrent)  # running sum of candidates
        z = torch.zeros_like(recurrent)  # running sum of c_sum
        block = []
        for tau in range(length):
            j = current[start + tau]
            if tau == 0:
                j = j + recurrent
            u = beta * u + j
            c = fast_sigmoid(u - 1.0, scale)
            c_sum = c_sum + c
            z = z + c_sum
            block.append(z - (z * (z != 1)).detach())
        block = torch.stack(block)  # (L, B, N)
        spikes.append(block)
        if recurrent_weight is not None:
            fired = block.amax(dim=0)
            if detach_recurrent:
                fired = fired.detach()
            recurrent = fired @ recurrent_weight.t()
            if recurrent_bias is not None:
                recurrent = recurrent + recurrent_bias
        start += length
    return torch.cat(spikes)


def lif_neurons(
    current: Tensor,
    beta: Tensor,
    recurrent_weight: Tensor | None = None,
    recurrent_bias: Tensor | None = None,
    scale: float = 10.0,
) -> Tensor:
    """docs/model.md §2 one step at a time. (T, B, N) -> (T, B, N).

    Args:
        current: input current, time-major (T, B, N).
        beta: per-neuron decay (N,).
        recurrent_weight: (N, N) or None (feedforward).
        recurrent_bias: (N,) or None.
        scale: slope of the fast-sigmoid surrogate.

    Returns:
        spikes (T, B, N).
    """
    spikes = []
    v = s = None  # membrane and spikes of the previous step
    for t in range(current.shape[0]):
        if t == 0:
            v = current[0]
        else:
            v = beta * (v - s) + current[t]
            if recurrent_weight is not None:
                v = v + s.detach() @ recurrent_weight.t()
                if recurrent_bias is not None:
                    v = v + recurrent_bias
        s = fast_sigmoid(v - 1.0, scale)
        spikes.append(s)
    return torch.stack(spikes)


def leaky_readout(
    current: Tensor, beta: Tensor, d: int | None = None, reduce: str = "sum"
) -> Tensor:
    """docs/model.md §4 one step at a time. (T, B, C) -> logits (B, C).

    Args:
        current: readout current, time-major (T, B, C).
        beta: per-class decay (C,).
        d: restart the state at every block boundary of a split into ``d`` blocks; None: never.
        reduce: ``"sum"`` or ``"max"`` over time.

    Returns:
        logits (B, C).
    """
    t_len = current.shape[0]
    starts = {0}
    if d is not None:
        start = 0
        for length in block_lengths(t_len, d):
            starts.add(start)
            start += length
    trace = []
    u = None
    for t in range(t_len):
        u = current[t] if t in starts else beta * u + current[t]
        trace.append(u)
    trace = torch.stack(trace)  # (T, B, C)
    if reduce == "sum":
        return trace.sum(0)
    if reduce == "max":
        return trace.amax(0)
    raise ValueError(f"unknown readout reduce {reduce!r}; valid: sum, max")
