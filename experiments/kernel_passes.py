"""Bytes of the chunked d-block layer, counted at dispatch level (``dispatch_count.py``): the
neuron part in passes over the (T, B, N) current, and where they go.

The neuron part of one forward + backward is the layer's bytes less its floor's (``nn.Linear``
alone on the same input), over ``T B N 4``; also the layer's bytes over the floor's and its CPU
time over the floor's (process time, median of ``--rounds``). ``--kernel-file`` counts another
version of ``dblock/functional/block_chunked.py`` (e.g. one from ``git show``) in its place.

    python -m experiments.kernel_passes --points shd --ops
    git show main:dblock/functional/block_chunked.py > /tmp/old.py
    python -m experiments.kernel_passes --kernel-file /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from functools import partial

import torch

from dblock.functional.blocks import neurons as block  # noqa: E402
from experiments.bench_impls import build, run_once
from experiments.dispatch_count import count_call
from experiments.points import poisson_input

POINTS = {  # name -> (T, d, n_in, n): the SHD layer and the Fig. 3 points gpu_check times
    "shd": [(500, 10, 700, 128)],
    "fig3": [(t, d, 1000, 100) for t in (512, 2048) for d in (5, 10, 30)],
}


def use_kernel_file(path: str) -> None:
    """Run the chunked kernel of ``path`` in place of dblock's."""
    spec = importlib.util.spec_from_file_location("chunked_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    block.chunked_kernel = module.chunked_kernel


def measure(t_len: int, d: int, n_in: int, n: int, mode: str, batch: int, rounds: int) -> dict:
    x = poisson_input(batch, n_in, t_len, "cpu")
    out = {}
    for impl in ("floor", "dblock_chunked"):
        torch.manual_seed(0)
        fn = build(impl, "layer", mode, n_in, n, None if impl == "floor" else d, "cpu")
        go = partial(run_once, fn, x, list(fn.parameters()))
        go()
        count = count_call(go)
        times = []
        for _ in range(rounds):
            start = time.process_time()
            go()
            times.append(time.process_time() - start)
        out[impl] = (count, statistics.median(times))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--points", default="shd,fig3", help="comma list of shd, fig3")
    p.add_argument("--modes", default="feedforward,recurrent")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernel-file", default=None, help="another block_chunked.py to count")
    p.add_argument("--ops", action="store_true", help="also the ops that move the most bytes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kernel_file:
        use_kernel_file(args.kernel_file)
    print("| point | mode | T | d | ops | bytes/floor | neuron passes | CPU time/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.points.split(","):
        for t_len, d, n_in, n in POINTS[name]:
            for mode in args.modes.split(","):
                got = measure(t_len, d, n_in, n, mode, args.batch, args.rounds)
                (layer, layer_s), (floor, floor_s) = got["dblock_chunked"], got["floor"]
                unit = t_len * args.batch * n * 4
                passes = (layer.bytes - floor.bytes) / unit
                print(
                    f"| {name} | {mode} | {t_len} | {d} | {layer.ops} | "
                    f"{layer.bytes / floor.bytes:.2f} | {passes:.1f} | {layer_s / floor_s:.2f} |",
                    flush=True,
                )
                if args.ops:
                    for op, ops, moved in layer.top(16):
                        print(f"|  | {op} x{ops} | | | | | {moved / unit:.2f} | |")


if __name__ == "__main__":
    main()
