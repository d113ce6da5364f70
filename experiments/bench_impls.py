"""The implementations the speed benchmark times: dblock's layers, the paper-style loop, peers;
and what the benchmark scripts share: the units of work (one fwd+bwd, one training step), the
skipping of a runner that cannot run, the allocator option, and the measures of one call (time
in interleaved rounds, peak memory, launching ops and bytes moved). Not a script; what is timed
on (grids, inputs, data) is in ``experiments/points.py``.

Each builder returns a callable that runs one forward pass and returns a tensor whose ``sum()``
is backpropagated, or raises ``Unavailable`` with the reason (a peer library not installed).
Everything is time-major, as dblock is. Layer scope: input spikes ``x`` (T, B, n_in) -> spikes.
Neurons scope: input current ``I`` (T, B, N), already projected, -> spikes. The floor is a plain
``nn.Linear`` on the contiguous time-major input.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from dblock import functional as F
from dblock.nn.layers import HIDDEN_BETA, DBlockLayer, LIFLayer, Projection
from dblock.runtime import tune_allocator
from experiments.dispatch_count import count_call

log = logging.getLogger(__name__)
PEERS = ("snntorch", "norse", "norse_compiled", "spikingjelly")
# dblock's d-block layer with the kernel ``auto`` picks for the device, or a named kernel
DBLOCK_KERNELS = {"dblock": "auto", "dblock_loop": "loop", "dblock_chunked": "chunked"}


class Unavailable(Exception):
    """An implementation that cannot run here (library missing, no fused backend, ...)."""


def warmed_up(
    make: Callable[[], Callable[[], None]], warmup: int, what: str
) -> Callable[[], None] | None:
    """The zero-argument callable ``make()`` returns, called ``warmup`` times; None, with a
    warning naming ``what``, if building or calling it fails (``Unavailable``, or any error: a
    peer that breaks must not stop the run)."""
    try:
        go = make()
        for _ in range(warmup):
            go()
    except Unavailable as err:
        log.warning("skipping %s: %s", what, err)
        return None
    except Exception as err:  # noqa: BLE001
        log.warning("skipping %s: %s: %s", what, type(err).__name__, err)
        return None
    return go


def paper_style_neurons(
    current: Tensor, beta: Tensor, weight: Tensor | None, bias: Tensor | None, scale: float = 10.0
) -> Tensor:
    """The standard LIF loop on a time-major current (T, B, N), indexing time as ``I[:, :, t]``
    on its (B, N, T) view, as the paper's baseline does; spikes (B, N, T). Benchmark only; the
    library iterates over time-major slices."""
    current = current.permute(1, 2, 0)  # (B, N, T) view, as the paper indexes it
    out = []
    v = s = None
    for t in range(current.shape[-1]):
        if t == 0:
            v = current[:, :, 0]
        else:
            v = beta * (v - s) + current[:, :, t]
            if weight is not None:
                v = v + s.detach() @ weight.t() + bias
        s = F.fast_sigmoid(v - 1.0, scale)
        out.append(s)
    return torch.stack(out, dim=-1)


def parse_with_malloc(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--default-malloc`` added; glibc's allocator is tuned as
    ``run.py`` tunes it (``dblock/runtime.py``) unless that flag is given."""
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's allocator as it is (default: tuned as run.py tunes it)",
    )
    args = parser.parse_args(argv)
    if not args.default_malloc:
        tune_allocator()
    return args


def run_once(fn, arg: Tensor, params: list[Tensor]) -> None:
    """One forward + backward of ``fn(arg).sum()``, the gradients of ``params`` cleared first."""
    for p in params:
        p.grad = None
    fn(arg).sum().backward()


def train_step(
    net: nn.Module, optimizer, x: Tensor, y: Tensor, autocast: torch.dtype | None = None
) -> None:
    """One training step: cross-entropy of ``net(x)``'s logits (its ``logits``, or the output
    itself) against ``y``, backward, ``optimizer`` step; the forward and the loss under
    ``torch.autocast`` to ``autocast`` when given."""
    optimizer.zero_grad()
    with torch.autocast(x.device.type, autocast) if autocast is not None else nullcontext():
        out = net(x)
        loss = cross_entropy(getattr(out, "logits", out), y)
    loss.backward()
    optimizer.step()


def endless(dm) -> Iterator[dict]:
    """The datamodule's training batches, as its loader yields them, epoch after epoch."""
    return (b for _ in itertools.count() for b in dm.train_dataloader())


def peak_memory_mb(go: Callable[[], None], device: str) -> float:
    """Peak memory allocated above the starting level during one call of ``go``, in MB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum, in time order, of the net
    allocations each operator makes and the frees the profiler records (``profile_memory``).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        go()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        go()
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak / 2**20


def dispatch_counts(go: Callable[[], None]) -> tuple[int, int]:
    """(launching ops, bytes moved) of one call of ``go``, counted at dispatch level
    (``experiments/dispatch_count.py``). Call after a warm-up."""
    count = count_call(go)
    return count.ops, count.bytes


def count_launching_ops(fn, arg: torch.Tensor, params: list[torch.Tensor]) -> tuple[int, int]:
    """(launching ops, bytes moved) of one forward + backward of ``fn(arg).sum()``."""
    return dispatch_counts(partial(run_once, fn, arg, params))


def interleaved_medians(calls: dict, rounds: int, device: str, clock: str = "wall") -> dict:
    """Median seconds of each call, timed in interleaved rounds (one call of each per round)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            sync(device)
            start = timer()
            call()
            sync(device)
            times[key].append(timer() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PaperStyleLayer(nn.Module):
    """Projection + the paper-style loop."""

    def __init__(self, n_in: int, n: int, recurrent: bool) -> None:
        super().__init__()
        self.projection = Projection(n_in, n)
        self.beta = nn.Parameter(torch.full((n,), HIDDEN_BETA))
        self.recurrent = nn.Linear(n, n) if recurrent else None

    def forward(self, x: Tensor) -> Tensor:
        rec = self.recurrent
        w, b = (rec.weight, rec.bias) if rec is not None else (None, None)
        return paper_style_neurons(self.projection(x), self.beta.clamp(0, 1), w, b)


class TimeMajorPeer(nn.Module):
    """A peer's neuron loop behind an ``nn.Linear`` on the time-major input. ``step`` maps a
    (T, B, N) current to (T, B, N) spikes."""

    def __init__(self, n_in: int | None, n: int, step: Callable[[Tensor], Tensor], mods) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n) if n_in is not None else None
        self.mods = nn.ModuleList(mods)
        self.step = step

    def forward(self, x: Tensor) -> Tensor:  # (T, B, n_in) input or (T, B, N) current
        return self.step(self.linear(x) if self.linear is not None else x)


def _snntorch(n: int, recurrent: bool):
    try:
        import snntorch
        from snntorch import surrogate
    except ImportError as err:
        raise Unavailable(f"snntorch not installed ({err})") from None
    grad = surrogate.fast_sigmoid(slope=10)
    if recurrent:
        cell = snntorch.RLeaky(HIDDEN_BETA, linear_features=n, spike_grad=grad)
    else:
        cell = snntorch.Leaky(HIDDEN_BETA, spike_grad=grad)

    def step(cur: Tensor) -> Tensor:
        out = []
        if recurrent:
            spk, mem = cell.init_rleaky()
        else:
            mem = cell.init_leaky()
        for i_t in cur.unbind(0):
            spk, mem = cell(i_t, spk, mem) if recurrent else cell(i_t, mem)
            out.append(spk)
        return torch.stack(out)

    return step, [cell]


def _norse(n: int, recurrent: bool, compiled: bool):
    try:
        import norse.torch as norse
    except ImportError as err:
        raise Unavailable(f"norse not installed ({err})") from None
    # membrane decay per step exp(-1/10) ~ 1 - dt * tau_mem_inv with dt = 1 ms
    params = norse.LIFParameters(tau_mem_inv=torch.tensor((1 - HIDDEN_BETA) / 1e-3))
    cell = norse.LIFRecurrentCell(n, n, p=params) if recurrent else norse.LIFCell(p=params)
    if recurrent:  # the recurrent cell owns an input matrix too: feed it the current directly
        with torch.no_grad():
            cell.input_weights.copy_(torch.eye(n))
        cell.input_weights.requires_grad_(False)
    run = torch.compile(cell, dynamic=False) if compiled else cell

    def step(cur: Tensor) -> Tensor:
        out, state = [], None
        for i_t in cur.unbind(0):
            spk, state = run(i_t, state)
            out.append(spk)
        return torch.stack(out)

    return step, [cell]


def _spikingjelly(n: int, recurrent: bool):
    try:
        from spikingjelly.activation_based import functional, layer, neuron, surrogate
    except ImportError as err:
        raise Unavailable(f"spikingjelly not installed ({err})") from None
    # SpikingJelly 2.0's LIFNode has one (torch) multi-step backend; the fused CuPy/Triton
    # backends of 0.0.0.0.x are gone from it.
    tau = 1.0 / (1.0 - HIDDEN_BETA)  # v <- v - v / tau + x: decay 1 - 1/tau = beta
    node = neuron.LIFNode(
        tau=tau,
        decay_input=False,
        v_reset=None,
        surrogate_function=surrogate.Sigmoid(),
        step_mode="s" if recurrent else "m",  # the recurrent container loops over steps
    )
    mod = layer.LinearRecurrentContainer(node, n, n, step_mode="m") if recurrent else node

    def step(cur: Tensor) -> Tensor:
        functional.reset_net(mod)
        return mod(cur)

    return step, [mod]


def build(
    impl: str, scope: str, mode: str, n_in: int, n: int, d: int | None, device: str
) -> Callable[[Tensor], Tensor]:
    """A module or function for ``impl`` at ``scope``: called on x (layer) or I (neurons)."""
    recurrent = mode == "recurrent"
    layer_in = n_in if scope == "layer" else None
    if impl == "floor":
        return nn.Linear(n_in, n).to(device)
    if impl in (*DBLOCK_KERNELS, "standard", "paper_style"):
        if scope == "layer":
            if impl in DBLOCK_KERNELS:
                kernel = DBLOCK_KERNELS[impl]
                return DBlockLayer(n_in, n, d, recurrent=recurrent, kernel=kernel).to(device)
            if impl == "standard":
                return LIFLayer(n_in, n, recurrent=recurrent).to(device)
            return PaperStyleLayer(n_in, n, recurrent).to(device)
        return _NeuronsOnly(impl, n, d, recurrent).to(device)
    if impl == "snntorch":
        step, mods = _snntorch(n, recurrent)
    elif impl in ("norse", "norse_compiled"):
        step, mods = _norse(n, recurrent, impl == "norse_compiled")
    elif impl == "spikingjelly":
        step, mods = _spikingjelly(n, recurrent)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return TimeMajorPeer(layer_in, n, step, mods).to(device)


class _NeuronsOnly(nn.Module):
    """dblock's neuron functions (or the paper-style loop) on a given current (T, B, N); a
    d-block ``impl`` names its kernel (``DBLOCK_KERNELS``)."""

    def __init__(self, impl: str, n: int, d: int | None, recurrent: bool) -> None:
        super().__init__()
        self.impl, self.d = impl, d
        self.beta = nn.Parameter(torch.full((n,), HIDDEN_BETA))
        self.weight = self.bias = None
        if recurrent:
            bound = math.sqrt(1.0 / n)
            self.weight = nn.Parameter(torch.empty(n, n).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, current: Tensor) -> Tensor:
        beta = self.beta.clamp(0, 1)
        if self.impl in DBLOCK_KERNELS:
            kernel = DBLOCK_KERNELS[self.impl]
            return F.dblock_neurons(current, beta, self.d, self.weight, self.bias, kernel=kernel)
        if self.impl == "standard":
            return F.lif_neurons(current, beta, self.weight, self.bias)
        return paper_style_neurons(current, beta, self.weight, self.bias)
