"""The input projection ``W x + b`` of a sparse event tensor, with a cost linear in the events.

A batch of input spikes is mostly zeros (SHD: about 1.4 % of the (T, B, n_in) counts are
non-zero), so the dense ``nn.Linear`` spends almost all its time multiplying zeros. Here the
input is a sparse COO tensor ``x`` of shape (..., n_in): event ``e`` puts ``v_e`` (a count) on
input unit ``u_e`` in row ``r_e`` (the flattened leading index, ``t * B + b`` for a time-major
batch). With ``G = dL/dout`` (R, n_out):

- forward: ``out[r] = b + sum_{e in row r} v_e W[:, u_e]``: one ``embedding_bag`` over the rows
  (events grouped by row, which a coalesced tensor already is: its indices are sorted), reading
  rows of the small table ``W^T`` (n_in, n_out);
- weight: ``dL/dW^T[u] = sum_{e: u_e = u} v_e G[r_e]``: another ``embedding_bag``, this time over
  ``G`` with the events grouped by unit (one argsort of the units, done here in the backward);
- bias: ``dL/db = sum_r G[r]``;
- values (only when ``x`` requires grad): ``dL/dv_e = G[r_e] . W[:, u_e]``.

The forward reads ``nnz * n_out`` numbers instead of the dense ``R * n_in * n_out`` products;
``embedding_bag``'s own backward would sort and scatter (several times slower than the pass
above). Every op is device-agnostic. Under autocast the weight and bias are cast to the autocast
dtype first, as autocast does for ``nn.Linear`` (``embedding_bag`` accumulates in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

VALUE_CHUNK = 1 << 16  # events per pass when the values' gradient is computed


def event_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for a sparse COO ``x`` (..., n_in); returns a dense (..., n_out).

    Equal to ``F.linear(x.to_dense(), weight, bias)`` up to the order of float summation.
    Repeated indices of an uncoalesced ``x`` add up (it is coalesced first, which sorts it: pass
    a coalesced tensor to skip that). ``x`` may require grad (its values get one).
    """
    if x.layout != torch.sparse_coo:
        raise TypeError(f"event_linear takes a sparse COO tensor, got layout {x.layout}")
    if x.dense_dim() != 0 or x.dim() < 2:
        raise ValueError(
            f"event_linear takes a sparse COO tensor of shape (..., n_in) with every dimension "
            f"sparse; got shape {tuple(x.shape)} with {x.dense_dim()} dense dimensions"
        )
    n_in = x.shape[-1]
    if weight.shape[-1] != n_in:
        raise ValueError(f"input has {n_in} units but the weight is {tuple(weight.shape)}")
    if not x.is_coalesced():
        x = x.coalesce()
    indices = x._indices()
    values = x.values() if x.requires_grad else x._values()
    lead = x.shape[:-1]
    rows = indices[0]
    for dim in range(1, len(lead)):  # row-major flat index of the leading dimensions
        rows = rows * lead[dim] + indices[dim]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    values = values.to(weight.dtype)
    n_rows = 1
    for size in lead:
        n_rows *= size
    offsets = torch.zeros(n_rows + 1, dtype=torch.long, device=x.device)
    torch.cumsum(_counts(rows, n_rows), 0, out=offsets[1:])
    with torch.autocast(device, enabled=False):
        out = _EventLinear.apply(indices[-1], rows, offsets, values, weight, bias)
    return out.view(*lead, weight.shape[0])


def _counts(index: Tensor, size: int) -> Tensor:
    """How often each of ``0 .. size-1`` occurs in ``index``, (size,) int64: ``bincount`` without
    its host sync (on CUDA it reads the largest index back to size its output)."""
    counts = torch.zeros(size, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index.long(), torch.ones_like(index, dtype=torch.long))


def _unit_index(units: Tensor, n_in: int) -> Tensor:
    """``units`` in the narrowest integer dtype that holds them: sorting int16 is about 3x faster
    than int64 on a CPU."""
    if n_in <= torch.iinfo(torch.int16).max:
        return units.to(torch.int16)
    return units.to(torch.int32) if n_in <= torch.iinfo(torch.int32).max else units


class _EventLinear(torch.autograd.Function):
    """``out (R, n_out)`` from events sorted by row; see the module docstring for the maths."""

    @staticmethod
    def forward(ctx, units, rows, offsets, values, weight, bias):
        # units, rows, values (nnz,), events sorted by row; offsets (R + 1,) where each row starts
        table = weight.t().contiguous()  # (n_in, n_out): one small copy
        out = F.embedding_bag(
            units, table, offsets, mode="sum", per_sample_weights=values, include_last_offset=True
        )
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(units, rows, values, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        units, rows, values, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            n_in = weight.shape[1]
            order = torch.argsort(_unit_index(units, n_in), stable=True)
            per_unit = torch.zeros(n_in + 1, dtype=torch.long, device=units.device)
            torch.cumsum(_counts(units, n_in), 0, out=per_unit[1:])
            grad_weight = F.embedding_bag(
                rows.index_select(0, order),  # (index_select: several times faster than [])
                grad_out,
                per_unit,
                mode="sum",
                per_sample_weights=values.index_select(0, order),
                include_last_offset=True,
            ).t()  # (n_out, n_in)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_out.sum(0)
        if ctx.needs_input_grad[3]:
            grad_values = torch.empty_like(values)
            for start in range(0, values.shape[0], VALUE_CHUNK):  # bounded memory
                part = slice(start, start + VALUE_CHUNK)
                g = grad_out.index_select(0, rows[part])
                w = weight.t().index_select(0, units[part])
                grad_values[part] = (g * w).sum(1)
        return None, None, None, grad_values, grad_weight, grad_bias
