"""How the T time steps split into d blocks (SPEC §3)."""

from __future__ import annotations

from dblock.values import is_int


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
