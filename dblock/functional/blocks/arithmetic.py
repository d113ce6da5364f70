"""The block arithmetic every d-block kernel shares (docs/model.md §3): the d range, the
block lengths (d blocks of ``floor(T / d)`` plus a remainder), blocks grouped by length, and the
powers of beta inside a block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.values import is_int


def block_groups(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal-length blocks as ``(start, n_blocks, length)``: the full blocks, then the
    remainder block if its length differs."""
    length = lengths[0]
    n_full = len(lengths) - (lengths[-1] != length)
    groups = [(0, n_full, length)]
    if n_full < len(lengths):
        groups.append((n_full * length, 1, lengths[-1]))
    return groups


def decay_powers(beta: Tensor, length: int) -> Tensor:
    """``beta ** k`` for ``k = 0 .. length-1``, shape (length, N); safe at ``beta = 0``."""
    ones = torch.ones_like(beta).unsqueeze(0)
    if length == 1:
        return ones
    return torch.cat([ones, torch.cumprod(beta.expand(length - 1, -1), dim=0)])


def check_d(d: int, t_len: int) -> None:
    """Raise ``ValueError`` naming d and T unless ``1 <= d <= T``.

    Args:
        d: the number of blocks (an int; a bool is refused).
        t_len: T, the number of time steps.
    """
    if not is_int(d):
        raise ValueError(f"d must be an integer number of blocks, got d={d!r} (T={t_len})")
    if not 1 <= d <= t_len:
        raise ValueError(
            f"d={d} is out of range for T={t_len} time steps: d must satisfy 1 <= d <= T"
        )


def block_lengths(t_len: int, d: int) -> list[int]:
    """Lengths of the blocks: ``d`` blocks of ``floor(T / d)`` plus a remainder block if any.

    Args:
        t_len: T, the number of time steps.
        d: the number of blocks, ``1 <= d <= T`` (else ``ValueError``, see ``check_d``).

    Returns:
        the block lengths in time order; they sum to T.
    """
    check_d(d, t_len)
    length = t_len // d
    lengths = [length] * d
    if t_len - d * length > 0:
        lengths.append(t_len - d * length)
    return lengths
