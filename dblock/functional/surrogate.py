"""Surrogate spike functions: a Heaviside forward with a smooth backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class FastSigmoidSpike(torch.autograd.Function):
    """Forward ``H(x)`` (strict: 1 where ``x > 0``); backward ``1 / (scale * |x| + 1)^2``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad / (ctx.scale * x.abs() + 1.0).square(), None


def fast_sigmoid(x: Tensor, scale: float = 10.0) -> Tensor:
    """Spike ``H(x)`` with the fast-sigmoid surrogate gradient (docs/model.md §1). Any shape.

    Args:
        x: the membrane minus the threshold, any shape.
        scale: slope of the surrogate: the backward is ``1 / (scale |x| + 1)^2``.

    Returns:
        0/1 spikes, same shape and dtype as ``x``.
    """
    return FastSigmoidSpike.apply(x, scale)


def fast_sigmoid_grad(x: Tensor, scale: float = 10.0) -> Tensor:
    """The surrogate derivative ``dS/dx = 1 / (scale |x| + 1)^2`` itself, for hand-written
    backward passes; ``x`` any shape, the result has its shape."""
    return 1.0 / (scale * x.abs() + 1.0).square()


SURROGATES: dict[str, Callable[[Tensor, float], Tensor]] = {"fast_sigmoid": fast_sigmoid}


def get_surrogate(name: str) -> Callable[[Tensor, float], Tensor]:
    """Look up a surrogate by name; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return SURROGATES[name]
    except KeyError:
        raise ValueError(
            f"unknown surrogate {name!r}; valid: {', '.join(sorted(SURROGATES))}"
        ) from None
