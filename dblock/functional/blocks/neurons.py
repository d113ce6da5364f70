"""The d-block neuron (docs/model.md §3): membrane without reset inside a block, first spike only.

All blocks of a feedforward layer are computed at once; a recurrent layer loops over blocks
(never over time steps). Tensors are time-major, (T, B, N), at the interface and inside. Two
kernels compute the same spikes and gradients behind one interface (``kernel=``):

- ``loop`` (``block_kernel``): linear in T, a Python loop over the L = T / d steps of a block,
  no copy of the current; the fastest on a CPU.
- ``chunked`` (``block_chunked``): decay Toeplitz matmuls over chunks of a block, a fixed number
  of ops whatever T and d; made for GPUs, where the number of launches sets the time.
- ``auto``: ``loop`` on the CPU, ``chunked`` on any other device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.blocks.arithmetic import block_lengths
from dblock.functional.blocks.chunked import chunk_plan, chunked_kernel
from dblock.functional.blocks.loop import dblock_kernel
from dblock.functional.precision import float32_dynamics

KERNELS = ("auto", "loop", "chunked")


def check_kernel(kernel: str, chunk: int | None = None) -> None:
    """Raise ``ValueError`` naming the bad value unless ``kernel`` and ``chunk`` are valid."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown d-block kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    chunk_plan([1], chunk)  # chunk: None or a positive integer


def pick_kernel(kernel: str, device: torch.device) -> str:
    """The kernel ``kernel`` runs on ``device``: ``auto`` is ``loop`` on the CPU (measured faster
    there) and ``chunked`` elsewhere."""
    check_kernel(kernel)
    if kernel == "auto":
        return "loop" if device.type == "cpu" else "chunked"
    return kernel


def _run(kernel: str, current, beta, lengths, weight, bias, scale, chunk) -> Tensor:
    if kernel == "chunked":
        return chunked_kernel(current, beta, lengths, weight, bias, scale, chunk)
    return dblock_kernel(current, beta, lengths, weight, bias, scale)


def _attached(
    current: Tensor,
    beta: Tensor,
    lengths: list[int],
    weight: Tensor,
    bias: Tensor | None,
    scale: float,
    kernel: str,
    chunk: int | None,
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
        spikes = _run(kernel, block, beta, [length], None, None, scale, chunk)  # (L, B, N)
        out.append(spikes)
        fired = spikes.amax(dim=0)  # (B, N)
        recurrent = fired @ weight.t()
        if bias is not None:
            recurrent = recurrent + bias
        start += length
    return torch.cat(out)


@float32_dynamics(cast_back=True)
def dblock_neurons(
    current: Tensor,
    beta: Tensor,
    d: int,
    recurrent_weight: Tensor | None = None,
    recurrent_bias: Tensor | None = None,
    detach_recurrent: bool = True,
    scale: float = 10.0,
    kernel: str = "auto",
    chunk: int | None = None,
) -> Tensor:
    """d-block spikes (docs/model.md §3).

    Args:
        current: input current ``W x + b``, time-major (T, B, N).
        beta: per-neuron decay (N,), used as given (callers clamp).
        d: number of blocks, ``1 <= d <= T``.
        recurrent_weight: (N, N) or None for a feedforward layer.
        recurrent_bias: (N,) or None.
        detach_recurrent: stop the gradient through the spikes fed back between blocks.
        scale: slope ``k`` of the fast-sigmoid surrogate.
        kernel: ``auto`` | ``loop`` | ``chunked`` (module docstring).
        chunk: the chunked kernel's chunk length; None: about sqrt(T / d).

    Returns:
        spikes (T, B, N) as 0/1 in ``current``'s dtype, carrying the straight-through gradient.
        Half-precision currents (autocast) are integrated in float32.
    """
    lengths = block_lengths(current.shape[0], d)
    kind = pick_kernel(kernel, current.device)
    check_kernel(kind, chunk)
    if recurrent_weight is not None and not detach_recurrent:
        return _attached(
            current, beta, lengths, recurrent_weight, recurrent_bias, scale, kind, chunk
        )
    return _run(kind, current, beta, lengths, recurrent_weight, recurrent_bias, scale, chunk)
