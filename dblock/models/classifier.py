"""Whole networks: hidden spiking layers and a leaky readout."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dblock.nn import DBlockLayer, LeakyReadout, LIFLayer
from dblock.values import boolean, positive_int

MODELS: dict[str, type[nn.Module]] = {"dblock": DBlockLayer, "standard": LIFLayer}


def get_layer(model: str) -> type[nn.Module]:
    """The hidden-layer class for ``model``; unknown names raise ``ValueError``."""
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(sorted(MODELS))}") from None


class Output(NamedTuple):
    logits: Tensor  # (B, n_classes)
    spikes: Tensor  # (B,) hidden spikes per sample, summed over hidden layers


class SNNClassifier(nn.Module):
    """Hidden layers of d-block or standard neurons followed by a leaky readout.

    Input: time-major counts (T, B, n_in). Output: logits (B, n_classes) and hidden spikes per
    sample (B,).
    The d-block readout restarts with the hidden layers' blocks; the standard one never does.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_classes: int = 20,
        model: str = "dblock",
        d: int = 10,
        recurrent: bool = True,
        detach_recurrent: bool = True,
        reduce: str = "sum",
        t_len: int | None = None,
        scale: float = 10.0,
        kernel: str = "auto",
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        layer = get_layer(model)
        positive_int("n_layers", n_layers)
        boolean("recurrent", recurrent)
        boolean("detach_recurrent", detach_recurrent)
        self.model = model
        sizes = [n_in] + [n_hidden] * n_layers
        self.hidden = nn.ModuleList(
            layer(
                n_in=a,
                n_out=b,
                d=d,
                recurrent=recurrent,
                detach_recurrent=detach_recurrent,
                t_len=t_len,
                scale=scale,
                kernel=kernel,
                chunk=chunk,
            )
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.readout = LeakyReadout(n_hidden, n_classes, d if model == "dblock" else None, reduce)

    def forward(self, x: Tensor) -> Output:
        spike_count = 0
        for layer in self.hidden:
            x = layer(x)
            # counted in float32: a half-precision sum would round counts above 256
            spike_count = spike_count + x.detach().sum(dim=(0, 2), dtype=torch.float32)
        return Output(self.readout(x), spike_count)
