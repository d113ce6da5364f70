"""Hand a trained network to other tools: ``torch.export`` and NIR.

``export_program(net, x)``: a ``torch.export`` program of an ``SNNClassifier`` (either model)
that returns the tuple ``(logits, spikes)``, so it can be saved with ``torch.export.save`` (the
classifier's own ``Output`` named tuple cannot be serialised). Limits (torch 2.13, tested in
``tests/test_library.py``):

- inputs are dense (T, B, n_in) tensors: a sparse COO input cannot be exported (its event count
  is data-dependent); T and n_in are fixed at export, the batch size may vary
  (``dynamic_batch=True``);
- the program is for inference: run it under ``torch.no_grad()`` (the d-block kernels write
  into preallocated buffers, which autograd does not allow on an exported graph);
- the kernel is the one ``kernel="auto"`` picks on the example's device (loop on the CPU,
  chunked on a GPU), fixed at export;
- ``torch.jit.script`` fails on both models, and ``torch.jit.trace`` fails on the d-block
  kernels ("Subtraction ... with a bool tensor is not supported"; it traces the standard SNN);
  torch recommends ``torch.export`` over TorchScript.

``to_nir(net)``: the standard SNN as a NIR graph (``pip install dblock[nir]``), which snnTorch,
Norse, SpikingJelly and neuromorphic hardware toolchains read. The d-block neuron has no NIR
primitive: NIR's neurons (LIF, CubaLIF, IF, LI) integrate step by step and reset per spike,
while a d-block neuron fires at most once per block of T/d steps and computes its membrane for
the whole block at once (a causal filter), restarting at every block boundary; NIR would need a
block-structured neuron node (block length, at-most-one-spike-per-block, state restart) and a
readout that restarts with the blocks. ``to_nir`` refuses a d-block network with that line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from dblock.models import SNNClassifier


class TupleOutput(nn.Module):
    """``net`` with a plain tuple ``(logits (B, C), spikes (B,))`` as its output."""

    def __init__(self, net: SNNClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, spikes)`` of ``x`` (T, B, n_in)."""
        out = self.net(x)
        return out.logits, out.spikes


def export_program(
    net: SNNClassifier, example: Tensor, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``net`` (eval mode, no grad) on the dense ``example`` (T, B, n_in).

    Args:
        net: a classifier, for example from ``dblock.load_model``.
        example: a dense time-major input; a sparse one is densified.
        dynamic_batch: let the batch size vary (T and n_in stay fixed).

    Returns:
        An ``ExportedProgram``; ``program.module()(x)`` gives ``(logits, spikes)``. Run it under
        ``torch.no_grad()``; save it with ``torch.export.save(program, "net.pt2")``.
    """
    if example.layout != torch.strided:
        example = example.to_dense()
    dynamic = ({1: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(TupleOutput(net.eval()), (example,), dynamic_shapes=dynamic)


def _tau(beta: Tensor, dt: float) -> np.ndarray:
    """The NIR time constant of a discrete decay ``beta``: ``tau = dt / (1 - beta)`` (forward
    Euler of ``tau dv/dt = -v + r I`` with ``r = tau / dt`` gives ``v_t = beta v_{t-1} + I_t``)."""
    b = beta.detach().double().cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.where(b < 1.0, dt / (1.0 - b), math.inf)


def to_nir(net: SNNClassifier, dt: float = 1e-3):
    """The standard SNN ``net`` as a ``nir.NIRGraph`` (needs ``pip install dblock[nir]``).

    Nodes per hidden layer ``i``: ``hidden.i.projection`` (``nir.Affine``), ``hidden.i.lif``
    (``nir.LIF``: ``tau = dt / (1 - beta)``, ``r = tau / dt``, ``v_leak = 0``,
    ``v_threshold = 1``, ``v_reset = 0``) and, when recurrent, ``hidden.i.recurrent``
    (``nir.Affine``, an edge back into ``hidden.i.lif``); then ``readout.projection``
    (``nir.Affine``) and ``readout.li`` (``nir.LI``), between ``input`` and ``output``.
    What NIR cannot say is in the graph's metadata: dblock's neuron resets by subtracting the
    threshold (``reset: subtract``; NIR's LIF resets to ``v_reset``), and the logits are
    ``sum_t U_t`` (or ``max_t``) of the readout's ``U`` (``readout``).

    Args:
        net: an ``SNNClassifier`` with ``model="standard"``.
        dt: the time step in seconds (the dataset's ``dt_ms / 1000``).

    Raises:
        ValueError: for a d-block network (no NIR primitive: see the module docstring).
        ImportError: when ``nir`` is not installed.
    """
    if net.model != "standard":
        raise ValueError(
            "to_nir: the d-block neuron has no NIR primitive (it fires at most once per block "
            "and restarts at block boundaries; NIR's neurons step and reset per spike); only "
            "model=standard networks export to NIR. Use export_program (torch.export) instead"
        )
    try:
        import nir
    except ImportError as err:
        raise ImportError("to_nir needs the nir package: pip install 'dblock[nir]'") from err

    def arr(t: Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    nodes: dict = {"input": nir.Input(input_type={"input": np.array([net.n_in])})}
    edges: list[tuple[str, str]] = []
    prev = "input"
    for i, layer in enumerate(net.hidden):
        name = f"hidden.{i}"
        tau = _tau(layer.beta(), dt)
        n = layer.n_out
        nodes[f"{name}.projection"] = nir.Affine(
            weight=arr(layer.projection.weight), bias=arr(layer.projection.bias)
        )
        nodes[f"{name}.lif"] = nir.LIF(
            tau=tau, r=tau / dt, v_leak=np.zeros(n), v_threshold=np.ones(n), v_reset=np.zeros(n)
        )
        edges += [(prev, f"{name}.projection"), (f"{name}.projection", f"{name}.lif")]
        if layer.recurrent is not None:
            nodes[f"{name}.recurrent"] = nir.Affine(
                weight=arr(layer.recurrent.weight), bias=arr(layer.recurrent.bias)
            )
            edges += [(f"{name}.lif", f"{name}.recurrent"), (f"{name}.recurrent", f"{name}.lif")]
        prev = f"{name}.lif"
    readout = net.readout
    tau = _tau(readout.beta(), dt)
    n_classes = readout.projection.out_features
    nodes["readout.projection"] = nir.Affine(
        weight=arr(readout.projection.weight), bias=arr(readout.projection.bias)
    )
    nodes["readout.li"] = nir.LI(tau=tau, r=tau / dt, v_leak=np.zeros(n_classes))
    nodes["output"] = nir.Output(output_type={"output": np.array([n_classes])})
    edges += [
        (prev, "readout.projection"),
        ("readout.projection", "readout.li"),
        ("readout.li", "output"),
    ]
    metadata = {
        "source": "dblock",
        "dt": dt,
        "reset": "subtract",
        "readout": f"logits = {readout.reduce}_t U_t of readout.li",
    }
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
