"""The standard (multi-spike) LIF neuron with reset by subtraction (docs/model.md §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from dblock.functional.precision import float32_dynamics
from dblock.functional.surrogate import fast_sigmoid


@float32_dynamics(cast_back=True)
def lif_neurons(
    current: Tensor,
    beta: Tensor,
    recurrent_weight: Tensor | None = None,
    recurrent_bias: Tensor | None = None,
    scale: float = 10.0,
) -> Tensor:
    """Standard LIF spikes, sequential over time (docs/model.md §2).

    ``V_0 = I_0``; ``V_t = beta (V_{t-1} - S_{t-1}) + I_t [+ sg(S_{t-1}) W_rec^T + b_rec]``;
    ``S_t = H(V_t - 1)`` with the fast-sigmoid surrogate. The gradient flows through the reset.

    Args:
        current: time-major input current (T, B, N). beta: (N,). recurrent_weight: (N, N) or
        None. recurrent_bias: (N,) or None. scale: surrogate slope.

    Returns:
        spikes (T, B, N).
    """
    # unbind, not current[t]: indexing step t of a tensor that needs grad makes the backward
    # O(T^2); on a contiguous time-major tensor each step is a contiguous (B, N) view.
    steps = current.unbind(0)
    out = []
    v = s = steps[0]  # s is first read at t = 1
    for t, i_t in enumerate(steps):
        if t > 0:
            v = beta * (v - s) + i_t
            if recurrent_weight is not None:
                v = v + s.detach() @ recurrent_weight.t()
                if recurrent_bias is not None:
                    v = v + recurrent_bias
        s = fast_sigmoid(v - 1.0, scale)
        out.append(s)
    return torch.stack(out)
