"""Neuron dynamics in float32 under mixed precision.

Under ``torch.autocast`` (Lightning's ``bf16-mixed`` and ``16-mixed``) the projections run in
half precision and hand the neurons a half-precision current. A membrane held in bfloat16 (8
bits of mantissa) would decide the threshold test ``U > 1`` on rounded values and the decay
powers ``beta^k`` would lose most of their digits, so the neuron functions upcast their inputs,
run with autocast off (their own matmuls, such as the recurrent ``W m``, stay float32 too) and
cast spikes, which are exactly 0 or 1, back to the current's dtype.

Matmuls that compute a membrane (the chunked kernel's decay Toeplitz products, the readout's
step weights) run in IEEE float32 whatever the process allows for other float32 matmuls
(``ieee_matmuls``): TF32 keeps 10 bits of mantissa and would move spikes. The setting is read and
written through the per-backend API (``torch.backends.cuda.matmul.fp32_precision``) where torch
has it, never through ``torch.get_float32_matmul_precision``, which raises once a program has
used the per-backend API ("mix of the legacy and new APIs").

Everything else (the input, recurrent and readout projections) follows the process setting,
float32 by default (docs/model.md §5). ``matmul_precision="high"`` (``task.matmul_precision``)
lets CUDA run those float32 matmuls in TF32 on GPUs that have it (Ampere and later): a numerics
choice, about 3 decimal digits per product instead of 7, for faster projections; the membrane
stays IEEE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def _matmul_backends() -> list:
    """The per-backend matmul settings (CUDA's cuBLAS, the CPU's oneDNN) torch has, or []."""
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    return [b for b in backends if hasattr(b, "fp32_precision")]


@contextmanager
def ieee_matmuls() -> Iterator[None]:
    """Float32 matmuls inside run in IEEE float32 (no TF32 or bf16 reduction); the settings are
    restored on exit. Uses the per-backend API where torch has it, the legacy one otherwise."""
    backends = _matmul_backends()
    if backends:
        old = [b.fp32_precision for b in backends]
        if all(o == "ieee" for o in old):
            yield
            return
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, o in zip(backends, old, strict=True):
                b.fp32_precision = o
        return
    legacy = torch.get_float32_matmul_precision()  # pragma: no cover (torch < 2.9)
    if legacy == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)


MATMUL_PRECISIONS = {"highest": "ieee", "high": "tf32"}  # name -> per-backend value


def check_matmul_precision(mode: str) -> None:
    """Raise ``ValueError`` listing the valid values unless ``mode`` is one."""
    if mode not in MATMUL_PRECISIONS:
        valid = ", ".join(MATMUL_PRECISIONS)
        raise ValueError(f"unknown matmul_precision {mode!r}; valid: {valid}")


def set_cuda_matmul_precision(mode: str) -> Callable[[], None]:
    """CUDA's float32 matmuls in ``mode`` (``highest``: IEEE float32; ``high``: TF32 where the
    GPU has it); returns a function that restores the previous setting. The per-backend API
    where torch has it, the legacy one otherwise, never both."""
    check_matmul_precision(mode)
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = MATMUL_PRECISIONS[mode]
        return lambda: setattr(matmul, "fp32_precision", old)
    legacy = torch.get_float32_matmul_precision()  # pragma: no cover (torch < 2.9)
    torch.set_float32_matmul_precision(mode)  # pragma: no cover
    return lambda: torch.set_float32_matmul_precision(legacy)  # pragma: no cover
