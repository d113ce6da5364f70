"""The d-block neuron as a family of kernels (docs/model.md §3), each tested against the
step-by-step reference in ``dblock/functional/reference.py``:

- ``neurons.py``: ``dblock_neurons``, the one entry point, which picks a kernel;
- ``arithmetic.py``: the block arithmetic every kernel shares (d range, block lengths, powers);
- ``loop.py``: the loop kernel, linear in T, forward and backward by hand;
- ``chunked.py``: the chunked kernel, blocks as batched matrix products.
"""
