"""Fig. 3 speed benchmark (docs/model.md §7): fwd+bwd of one hidden layer, d-block vs standard vs
peers, and a whole training step at the SHD shape.

One hidden layer (projection + neurons, no readout) on Poisson input (1000 units, per-sample rate
~ U(0, 200) Hz, 1 ms steps), batch 128. For each grid point it times, side by side and in
interleaved rounds (median reported): the floor (``nn.Linear`` alone on the contiguous
time-major input), dblock's d-block layer for each d, dblock's standard layer, the paper-style
(B, N, T)-indexed standard loop, and the peers that are installed (``pip install -e
".[bench]"``). Scopes: whole layer (x -> spikes), neurons only (current -> spikes), and, at the
SHD point, the whole training step (``StepPoint`` in ``experiments/points.py``: the batch build
by the SHD datamodule, the floor on that batch, then model + loss + Adam for d-block and
standard; with dense batches as scope ``step`` and sparse ones, through the event-driven
projection, as scope ``step_sparse``). Also the peak memory of one call, and what one call
launches and moves, counted at dispatch level
(``experiments/dispatch_count.py``): ``launching_ops`` (ops that launch a kernel, a proxy for GPU
launches) and ``bytes_moved`` (their inputs' and outputs' bytes, a proxy for a GPU's memory
traffic); ``dblock`` runs the kernel ``auto`` picks for the device, ``dblock_loop`` /
``dblock_chunked`` name one, e.g. ``--impls dblock_chunked`` on the CPU counts the ops and bytes
of the GPU's kernel. Rows are appended to a CSV as each point finishes; rows already there are
skipped (resumable). glibc's allocator is tuned as ``run.py`` tunes it (``dblock/runtime.py``)
unless ``--default-malloc``.

    python -m experiments.bench_speed --grid full --out outputs/bench_speed.csv
    python -m experiments.bench_speed --panels shd --d 10 --rounds 7 --out outputs/shd.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from experiments.bench_impls import (
    DBLOCK_KERNELS,
    PEERS,
    build,
    dispatch_counts,
    interleaved_medians,
    parse_with_malloc,
    peak_memory_mb,
    run_once,
    warmed_up,
)
from experiments.points import D_VALUES, GRIDS, INPUTS, StepPoint, poisson_input
from experiments.points import SCOPES as STEP_SCOPES

log = logging.getLogger("bench_speed")
COLUMNS = (
    "panel,mode,impl,scope,d,t_len,n_hidden,n_in,batch,device,time_ms,peak_mem_mb,"
    "launching_ops,bytes_moved"
).split(",")
KEY = COLUMNS[:10]
STEP_INPUTS = {scope: inp for inp, scope in STEP_SCOPES.items()}  # step scope -> input path
def point_cases(args, mode: str, n_in: int, n: int, t_len: int, panel: str) -> list[tuple]:
    """(impl, scope, d) triples to time at one grid point. The step scope (a whole training step
    on batches from the real datamodule) exists at the SHD point only; its cases start with the
    batch build, which makes the batch the round's other step cases use."""
    cases = [("floor", "layer", None)]
    d_values = [d for d in args.d if d <= t_len]
    for scope in args.scopes:
        if scope == "step":
            if panel == "shd":
                for inp in args.inputs:
                    step = STEP_SCOPES[inp]
                    proj = "floor" if inp == "dense" else "projection"
                    cases += [("data", step, None), (proj, step, None)]
                    cases += [(impl, step, d) for impl in DBLOCK_KERNELS for d in d_values]
                    cases += [("standard", step, None)]
            continue
        cases += [(impl, scope, d) for impl in DBLOCK_KERNELS for d in d_values]
        cases += [(impl, scope, None) for impl in ("standard", "paper_style") if impl in args.impls]
        cases += [(p, scope, None) for p in PEERS if p in args.impls]
    return [c for c in cases if c[0] in ("floor", "data", "projection") or c[0] in args.impls]


def make_runner(args, case: tuple, point: tuple, inputs: dict, steps: dict) -> Callable[[], None]:
    """A zero-argument callable timing one unit of ``case`` (impl, scope, d) at ``point``
    (panel, mode, n_in, n, t_len). ``inputs`` caches what the point's cases share, ``steps`` the
    step scope's data, {(n_in, t_len): StepPoint}, shared by the points of that shape."""
    impl, scope, d = case
    panel, mode, n_in, n, t_len = point
    device = args.device
    if scope in STEP_INPUTS:
        if (n_in, t_len) not in steps:
            rounds = args.rounds + args.warmup
            steps[n_in, t_len] = StepPoint(args.data_dir, n_in, t_len, args.batch, rounds, device)
        return steps[n_in, t_len].runner(impl, mode, n, d, STEP_INPUTS[scope])
    if "x" not in inputs:
        x = poisson_input(args.batch, n_in, t_len, device)
        with torch.no_grad():  # a realistic current for the neurons-only scope
            current = build("floor", "layer", mode, n_in, n, None, device)(x)
        inputs["x"], inputs["current"] = x, current.detach().requires_grad_()
    fn = build(impl, scope, mode, n_in, n, d, device)
    arg = inputs["x"] if scope == "layer" else inputs["current"]
    params = list(fn.parameters()) + ([arg] if scope == "neurons" else [])
    return partial(run_once, fn, arg, params)


def measure_point(
    args, panel: str, mode: str, n_in: int, n: int, t_len: int, done: set, steps: dict
) -> list:
    """Time every case at one point, interleaved over rounds; returns CSV rows. ``steps``: see
    ``make_runner``."""
    device = args.device
    base = [panel, mode]
    key_tail = [t_len, n, n_in, args.batch, device]
    todo = [
        c
        for c in point_cases(args, mode, n_in, n, t_len, panel)
        if tuple(map(str, base + [c[0], c[1], c[2] or ""] + key_tail)) not in done
    ]
    if not todo:
        return []
    runners, inputs = {}, {}
    for case in todo:
        impl, scope, _ = case
        make = partial(make_runner, args, case, (panel, mode, n_in, n, t_len), inputs, steps)
        go = warmed_up(make, args.warmup, f"{impl} ({scope}, {mode})")
        if go is not None:
            runners[case] = go
    times = interleaved_medians(runners, args.rounds, device, args.clock)
    rows = []
    for case, go in runners.items():
        impl, scope, d = case
        mem = peak_memory_mb(go, device) if args.memory else float("nan")
        ops, moved = dispatch_counts(go)
        ms = times[case] * 1e3
        rows.append(
            base + [impl, scope, d or ""] + key_tail + [f"{ms:.3f}", f"{mem:.2f}", ops, moved]
        )
    return rows


def read_done(path: Path) -> set:
    """Keys of the rows already in the CSV; ``SystemExit`` if it has other columns."""
    if not path.exists():
        return set()
    with path.open() as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and reader.fieldnames != COLUMNS:
            raise SystemExit(
                f"error: {path} has the columns of another version of this benchmark "
                f"({','.join(reader.fieldnames)}); write to a new file with --out"
            )
        return {tuple(row[k] for k in KEY) for row in reader}


def grid_points(args) -> list[tuple]:
    """(panel, mode, n_in, n_hidden, t_len) for the chosen grid and panels."""
    grid = GRIDS["quick" if args.quick else args.grid]
    points = []
    for panel in args.panels:
        if panel not in grid:
            continue
        mode, shapes, n_in = grid[panel]
        modes = args.modes if mode is None else [mode]
        for t_len, n in shapes:
            if args.t and t_len not in args.t:
                continue
            points += [(panel, m, n_in, n, t_len) for m in modes]
    return points


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--grid", default="reduced", choices=["full", "reduced"])
    p.add_argument("--panels", default="shd,a,b,c,d", help="comma list of a,b,c,d,shd")
    p.add_argument("--modes", default="feedforward,recurrent", help="modes of the shd panel")
    p.add_argument("--t", default="", help="only these t_len values (comma list)")
    p.add_argument("--d", default=",".join(map(str, D_VALUES)), help="d values (comma list)")
    p.add_argument("--impls", default="dblock,standard,paper_style," + ",".join(PEERS))
    p.add_argument(
        "--scopes",
        default="layer,neurons,step",
        help="layer: projection + neurons; neurons: current -> spikes; step: a whole training\n"
        "step (model, loss, Adam) on batches from the SHD datamodule (shd panel only)",
    )
    p.add_argument(
        "--inputs",
        default=",".join(INPUTS),
        help="batch formats of the step scope: dense (rows with scope step) and sparse\n"
        "(scope step_sparse)",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1 on a shared\n"
        "CPU it leaves out the time other processes hold the core; CPU devices only)",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the step scope writes its SHD-like files (default: a temporary directory)",
    )
    p.add_argument("--out", default="outputs/bench_speed.csv")
    args = parse_with_malloc(p, argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    args.panels, args.modes = args.panels.split(","), args.modes.split(",")
    args.impls, args.scopes = args.impls.split(","), args.scopes.split(",")
    args.inputs = args.inputs.split(",")
    if not set(args.inputs) <= set(INPUTS):
        p.error(f"--inputs takes {', '.join(INPUTS)}, got {','.join(args.inputs)}")
    args.t, args.d = ints(args.t), ints(args.d)
    if args.quick:
        args.batch, args.d, args.rounds, args.warmup = 4, [2, 4], 2, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.device.startswith("cuda") and args.clock == "cpu":
        p.error("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    return args


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        given = args.data_dir
        with nullcontext(given) if given is not None else tempfile.TemporaryDirectory() as tmp:
            args.data_dir = Path(tmp)
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> Path:
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    points = grid_points(args)
    log.info(
        "%d points, torch %s, %d threads, device %s, load average %.2f -> %s",
        len(points),
        torch.__version__,
        torch.get_num_threads(),
        args.device,
        os.getloadavg()[0],
        out,
    )
    from tqdm import tqdm

    new_file = not out.exists()
    steps = {}  # the step scope's data, read once per shape
    with out.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(COLUMNS)
        for point in tqdm(
            points, desc="bench", disable=not sys.stderr.isatty() and "CI" in os.environ
        ):
            rows = measure_point(args, *point, done, steps)
            writer.writerows(rows)
            f.flush()
    return out


if __name__ == "__main__":
    main()
