"""Non-spiking leaky readout (SPEC §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.block_kernel import decay_powers
from dblock.functional.blocks import block_lengths
from dblock.functional.precision import float32_dynamics

REDUCTIONS = ("sum", "max")


def check_reduce(reduce: str) -> None:
    """Raise ``ValueError`` listing the valid reductions unless ``reduce`` is one."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown readout reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")


def _lengths(t_len: int, d: int | None) -> list[int]:
    return [t_len] if d is None else block_lengths(t_len, d)


@float32_dynamics(cast_back=False)
def leaky_readout(
    current: Tensor, beta: Tensor, d: int | None = None, reduce: str = "sum"
) -> Tensor:
    """Logits of the leaky integrator ``U_t = beta U_{t-1} + I_t``.

    Args:
        current: time-major readout current ``W_o S + b_o``, (T, B, C).
        beta: (C,) decay, used as given.
        d: restart the state at 0 at every block boundary of the d-block split; None: never.
        reduce: "sum" (``sum_t U_t``) or "max" (``max_t U_t``).

    Returns:
        logits (B, C); float32 for a half-precision current (autocast).
    """
    check_reduce(reduce)
    lengths = _lengths(current.shape[0], d)
    if reduce == "sum":
        return (current * _sum_weights(beta, lengths).unsqueeze(1)).sum(0)
    starts = {0}
    for length in lengths[:-1]:
        starts.add(max(starts) + length)
    u = best = None
    for t, i_t in enumerate(current.unbind(0)):
        u = i_t if t in starts else beta * u + i_t
        best = u if best is None else torch.maximum(best, u)
    return best


def _sum_weights(beta: Tensor, lengths: list[int]) -> Tensor:
    """Weight (T, C) of each input step in ``sum_t U_t``.

    An input at step s of a block that ends at step e contributes ``sum_{k=0}^{e-s} beta^k``.
    """
    partial = decay_powers(beta, max(lengths)).cumsum(0)  # (L, C): sum_{k<=m} beta^k
    to_end = torch.cat([torch.arange(n - 1, -1, -1) for n in lengths]).to(beta.device)
    return partial[to_end]
