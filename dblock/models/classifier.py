"""Whole networks: hidden spiking layers and a leaky readout."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dblock.nn import DBlockLayer, LeakyReadout, LIFLayer
from dblock.nn.layers import check_input
from dblock.values import boolean, positive_int

MODELS: dict[str, type[nn.Module]] = {"dblock": DBlockLayer, "standard": LIFLayer}


def get_layer(model: str) -> type[nn.Module]:
    """The hidden-layer class for ``model`` (``"dblock"``: ``DBlockLayer``, ``"standard"``:
    ``LIFLayer``); unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(sorted(MODELS))}") from None


class Output(NamedTuple):
    """What ``SNNClassifier`` returns.

    Attributes:
        logits: (B, n_classes) class scores (``argmax`` is the predicted class).
        spikes: (B,) hidden spikes per sample, summed over hidden layers (float32).
    """

    logits: Tensor  # (B, n_classes)
    spikes: Tensor  # (B,) hidden spikes per sample, summed over hidden layers


class SNNClassifier(nn.Module):
    """Hidden layers of d-block or standard neurons followed by a leaky readout.

    Input: time-major counts (T, B, n_in), dense or a sparse COO tensor. Output: ``Output``
    with logits (B, n_classes) and hidden spikes per sample (B,).
    The d-block readout restarts with the hidden layers' blocks; the standard one never does.

    Args:
        n_in: inputs per time step (the dataset's channels).
        n_hidden: neurons per hidden layer.
        n_layers: number of hidden layers (>= 1).
        n_classes: number of classes.
        model: ``"dblock"`` (``DBlockLayer``, docs/model.md §3) or ``"standard"``
            (``LIFLayer``, §2).
        d: number of blocks of the d-block model, ``1 <= d <= T`` (ignored by ``standard``).
        recurrent: recurrent hidden layers (else feedforward).
        detach_recurrent: stop the gradient through the d-block layers' fed-back spikes.
        reduce: readout logits, ``"sum"`` (``sum_t U_t``) or ``"max"`` (``max_t U_t``).
        t_len: T, when known: ``d`` is checked against it, and ``forward`` refuses an input
            whose time axis is not T (for example a batch-first (B, T, n_in) tensor). None:
            any T is accepted.
        scale: slope of the fast-sigmoid surrogate gradient.
        kernel: the d-block kernel, ``auto`` | ``loop`` | ``chunked``.
        chunk: the chunked kernel's chunk length; None: about sqrt(T / d).

    ``config`` holds these arguments as a dict (what ``dblock.load_model`` reads back from a
    checkpoint: ``SNNClassifier(**net.config)`` builds the same network).
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
        self.config = {
            "n_in": n_in, "n_hidden": n_hidden, "n_layers": n_layers, "n_classes": n_classes,
            "model": model, "d": d, "recurrent": recurrent, "detach_recurrent": detach_recurrent,
            "reduce": reduce, "t_len": t_len, "scale": scale, "kernel": kernel, "chunk": chunk,
        }  # fmt: skip
        self.n_in, self.t_len = n_in, t_len
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
        """Logits (B, n_classes) and hidden spikes per sample (B,) of ``x`` (T, B, n_in)."""
        check_input(x, self.n_in, "SNNClassifier", self.t_len)
        spike_count = 0
        for layer in self.hidden:
            x = layer(x)
            # counted in float32: a half-precision sum would round counts above 256
            spike_count = spike_count + x.detach().sum(dim=(0, 2), dtype=torch.float32)
        return Output(self.readout(x), spike_count)
