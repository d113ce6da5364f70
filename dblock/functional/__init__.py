"""Pure functions on tensors: surrogate, standard LIF, d-block kernels, readout, the sparse
input projection, reference."""

from dblock.functional import reference
from dblock.functional.blocks.arithmetic import block_lengths, check_d
from dblock.functional.blocks.neurons import check_kernel, dblock_neurons, pick_kernel
from dblock.functional.event_linear import event_linear
from dblock.functional.lif import lif_neurons
from dblock.functional.readout import leaky_readout
from dblock.functional.surrogate import fast_sigmoid, get_surrogate

__all__ = [
    "block_lengths",
    "check_d",
    "check_kernel",
    "dblock_neurons",
    "event_linear",
    "fast_sigmoid",
    "get_surrogate",
    "leaky_readout",
    "lif_neurons",
    "pick_kernel",
    "reference",
]
