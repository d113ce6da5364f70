"""Neuron dynamics in float32 under mixed precision.

Under ``torch.autocast`` (Lightning's ``bf16-mixed`` and ``16-mixed``) the projections run in
half precision and hand the neurons a half-precision current. A membrane held in bfloat16 (8
bits of mantissa) would decide the threshold test ``U > 1`` on rounded values and the decay
powers ``beta^k`` would lose most of their digits, so the neuron functions upcast their inputs,
run with autocast off (their own matmuls, such as the recurrent ``W m``, stay float32 too) and
cast spikes, which are exactly 0 or 1, back to the current's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def _up(x):
    return x.float() if isinstance(x, Tensor) and x.dtype in HALF else x


def float32_dynamics(cast_back: bool) -> Callable:
    """Decorate ``fn(current, ...)``: under autocast, or for a half-precision ``current``, run
    it in float32 with autocast off; ``cast_back`` returns the result in ``current``'s dtype
    (spikes), otherwise in float32 (logits)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(current: Tensor, *args, **kwargs):
            kind = current.device.type
            if current.dtype not in HALF and not torch.is_autocast_enabled(kind):
                return fn(current, *args, **kwargs)
            with torch.autocast(kind, enabled=False):
                out = fn(_up(current), *map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(current.dtype) if cast_back else out

        return wrapper

    return decorate
