"""What the per-layer spike statistics (``dblock.training.spike_stats``) cost a training step.

The whole training step of the task (``SNNTask.training_step``: model, cross-entropy, the
accuracy / loss / spike metrics; then backward and an Adam step), timed with the callback's hooks
on the hidden layers ("on") and without ("off"), plus "off" again ("off2", an A/A control that
shows the noise), in interleaved rounds (each variant first in turn); the median step time of
each is reported, and the ratios on/off and off2/off. As the difference is within the
noise of a busy machine, the hooks' own work is also timed alone on the layers' real outputs
(``hooks``), and 1 + hooks / off given as the direct estimate. Input: Poisson spikes (T, B, n_in),
time-major, at the SHD shape by default (T 500, n_in 700, 128 hidden, batch 128, 20 classes).
One torch thread unless ``--threads``: on a shared machine, compare the ratios of one run.

    python -m experiments.bench_spike_stats                       # CPU, 1 thread, 1 and 2 layers
    python -m experiments.bench_spike_stats --device cuda --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dblock.models import SNNClassifier
from dblock.training.spike_stats import SpikeStats
from dblock.training.task import SNNTask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(task: SNNTask, optimizer, x, y):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = task.training_step((x, y), 0)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def hook_time(net, stats: SpikeStats, x, args) -> float:
    """The work the hooks add to one step, timed alone (ms, median): each layer's hook on that
    layer's real output. Less noisy than the on/off difference on a busy machine."""
    with torch.no_grad():
        outs = []
        for layer in net.hidden:
            x = layer(x)
            outs.append(x)
    hooks = [stats._hook(i) for i in range(len(outs))]

    def run() -> None:
        for hook, out in zip(hooks, outs, strict=True):
            hook(None, None, out)

    times = [time_steps(run, args.steps, args.device) for _ in range(args.rounds + args.warmup)]
    return 1e3 * statistics.median(times[args.warmup :])


def bench(args, layers: int) -> dict:
    torch.manual_seed(0)
    net = SNNClassifier(
        n_in=args.n_in,
        n_hidden=args.n_hidden,
        n_layers=layers,
        n_classes=20,
        model=args.model,
        d=args.d,
        t_len=args.t_len,
    ).to(args.device)
    task = SNNTask(net, n_classes=20).to(args.device)
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(args.t_len, args.batch, args.n_in, generator=g) < args.rate).float()
    y = torch.randint(0, 20, (args.batch,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    stats = SpikeStats()
    stats.setup(None, task, "fit")  # the forward hooks, as the Trainer's setup installs them
    stats._start("train")
    hooks = stats._handles
    step = make_step(task, optimizer, x, y)

    def attach(on: bool) -> None:
        for h in list(hooks):  # attach or detach the hooks
            h.remove()
        hooks.clear()
        if on:
            hooks.extend(
                layer.register_forward_hook(stats._hook(i)) for i, layer in enumerate(net.hidden)
            )

    # "off2" is "off" again: its ratio to "off" shows the noise of the measurement (A/A)
    names = ("off", "on", "off2")
    times = {name: [] for name in names}
    for name in names:  # warm-up
        attach(name == "on")
        time_steps(step, args.warmup, args.device)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # each variant first in turn
            attach(name == "on")
            times[name].append(time_steps(step, args.steps, args.device))
    off, on, off2 = (statistics.median(times[name]) for name in names)
    hooks_ms = hook_time(net, stats, x, args)
    rate, silent = stats.counters["train"][0].stats()
    return {
        "layers": layers,
        "off_ms": 1e3 * off,
        "on_ms": 1e3 * on,
        "ratio": on / off,
        "aa_ratio": off2 / off,
        "hooks_ms": hooks_ms,
        "direct_ratio": 1 + hooks_ms / (1e3 * off),
        "layer1_rate": float(rate),
        "layer1_silent": float(silent),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1)")
    p.add_argument("--model", default="dblock", choices=["dblock", "standard"])
    p.add_argument("--layers", default="1,2", help="hidden layers (comma list)")
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--t-len", type=int, default=500)
    p.add_argument("--n-in", type=int, default=700)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rate", type=float, default=0.02, help="input spike probability per step")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=3, help="steps timed per round and variant")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: log() is a no-op
    rows = []
    print(
        f"{args.model} d={args.d} T={args.t_len} n_in={args.n_in} n={args.n_hidden} "
        f"B={args.batch} on {args.device} ({torch.get_num_threads()} thread(s)), "
        f"{args.rounds} interleaved rounds x {args.steps} steps, medians"
    )
    print(
        "layers  step off (ms)  step on (ms)  on/off  off2/off (A/A)  hooks (ms)  "
        "1 + hooks/off  layer1 rate  silent"
    )
    for layers in map(int, args.layers.split(",")):
        r = bench(args, layers)
        rows.append(r)
        print(
            f"{r['layers']:>6}  {r['off_ms']:>13.2f}  {r['on_ms']:>12.2f}  {r['ratio']:>6.3f}"
            f"  {r['aa_ratio']:>14.3f}  {r['hooks_ms']:>10.2f}  {r['direct_ratio']:>13.4f}"
            f"  {r['layer1_rate']:>11.4f}  {r['layer1_silent']:>6.3f}"
        )
    return rows


if __name__ == "__main__":
    main()
