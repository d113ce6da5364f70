"""What one call launches and moves, counted at dispatch level (a proxy for a GPU's kernels and
memory traffic, measured on any device).

A ``TorchDispatchMode`` sees every ATen op that reaches a backend, forward and backward, inside
composite ops too (``bmm`` under ``matmul``, the ops of an autograd formula). An op that launches
a kernel counts once in ``launching_ops`` and adds the bytes of its tensor inputs and outputs to
``bytes_moved``; ops that launch none (views, ``as_strided``, ``empty*``, ``resolve_conj`` /
``resolve_neg``, ``detach``, reading a size) count nothing. A tensor's bytes are its elements
times their size, broadcast (stride-0) dimensions left out: an expanded scalar moves one value.
An in-place op reads and writes its first argument (counted twice), except ``copy_``,
``zero_`` and ``fill_``, which only write it; an ``out=`` tensor is only written. Reused by the
speed benchmark, ``gpu_check`` and the kernel tests.

    with DispatchCount() as count:
        fn(x).sum().backward()
    count.ops, count.bytes, count.by_op
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
NO_KERNEL = {  # ops that only make a view, allocate, or read metadata
    aten.view, aten._unsafe_view, aten.as_strided, aten.expand, aten.permute, aten.transpose,
    aten.t, aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.alias, aten.detach,
    aten.unfold, aten.diagonal, aten.split, aten.split_with_sizes, aten.unbind, aten.chunk,
    aten.narrow, aten.view_as_real, aten.view_as_complex, aten._reshape_alias, aten.lift_fresh,
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.resolve_conj, aten.resolve_neg, aten._conj, aten._neg_view, aten.sym_size,
    aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.is_same_size, aten.set_,
    aten._local_scalar_dense, aten.unflatten, aten.flatten, aten.reshape, aten.view_as,
    aten.expand_as, aten.movedim, aten.swapaxes, aten.contiguous,
}  # fmt: skip
WRITE_ONLY = {aten.copy_, aten.zero_, aten.fill_}  # in place, but the old values are not read


def tensor_bytes(x: torch.Tensor) -> int:
    """Bytes of ``x``'s distinct elements: its size, broadcast (stride-0) dimensions left out."""
    n = 1
    for size, stride in zip(x.shape, x.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * x.element_size()


class DispatchCount(TorchDispatchMode):
    """Counts launching ops (``ops``), their bytes (``bytes``) and both per op name
    (``by_op``: name -> [ops, bytes])."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket not in NO_KERNEL:
            given = {k: v for k, v in kwargs.items() if k != "out"}
            if func.overloadpacket in WRITE_ONLY:
                args = args[1:]
            reads = [x for x in tree_flatten((args, given))[0] if isinstance(x, torch.Tensor)]
            writes = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
            moved = sum(map(tensor_bytes, reads)) + sum(map(tensor_bytes, writes))
            self.ops += 1
            self.bytes += moved
            entry = self.by_op.setdefault(func.overloadpacket.__name__, [0, 0])
            entry[0] += 1
            entry[1] += moved
        return out

    def top(self, n: int = 12) -> list[tuple[str, int, int]]:
        """The ``n`` ops that move the most bytes: (name, ops, bytes)."""
        rows = sorted(self.by_op.items(), key=lambda kv: -kv[1][1])[:n]
        return [(name, ops, moved) for name, (ops, moved) in rows]


def count_call(go: Callable[[], object]) -> DispatchCount:
    """The ``DispatchCount`` of one call of ``go`` (call it after a warm-up)."""
    with DispatchCount() as count:
        go()
    return count
