"""Ratios from the speed benchmark's CSV, as markdown tables.

    python -m experiments.bench_summary outputs/bench_speed_cpu.csv

For every (panel, mode, t_len, n_hidden, device): the d-block layer over the floor, the speedup
of the d-block over dblock's standard layer (whole layer and neurons only: standard time /
d-block time), each other implementation's whole-layer time over the d-block's, peak memory, and
the launching ops per fwd+bwd of the d-block layer and the standard one, and the d-block layer's
bytes moved over the floor's (CSVs that have them; ``aten_ops`` in older CSVs). When
the CSV holds both d-block kernels (``--impls dblock_loop,dblock_chunked``), a table compares
them: chunked time / loop time, layer and neurons only, and their op counts. Where the CSV has
the whole-step scope, a table of each training step over the floor (dense ``nn.Linear`` on the
dense batch), for each input path (dense batches; sparse batches through the event-driven
projection), d-block step / standard step as a speedup, and the batch build as a share of the
d-block step.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

SCOPES_LAYER = ("layer", "neurons")
OTHERS = ("paper_style", "snntorch", "norse", "norse_compiled", "spikingjelly")


def load(path: str) -> dict:
    """{(panel, mode, t_len, n_hidden, device): {(impl, scope, d): (time_ms, peak_mem_mb,
    launching ops or None, bytes moved or None)}}."""
    points: dict = defaultdict(dict)
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["panel"], r["mode"], int(r["t_len"]), int(r["n_hidden"]), r["device"])
            points[key][(r["impl"], r["scope"], r["d"])] = (
                float(r["time_ms"]),
                float(r["peak_mem_mb"]),
                _int(r.get("launching_ops", r.get("aten_ops"))),
                _int(r.get("bytes_moved")),
            )
    return points


def _int(text: str | None) -> int | None:
    return int(text) if text else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(points: dict) -> str:
    """One row per point and d."""
    head = (
        "| panel | mode | T | n | d | floor ms | dblock layer/floor | speedup layer | "
        "speedup neurons | " + " | ".join(f"{o}/dblock" for o in OTHERS) + " | mem dblock/std |"
        " ops dblock | ops std | bytes dblock/floor |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(points):
        cases = points[key]
        floor_case = cases.get(("floor", "layer", ""))
        floor = floor_case[0] if floor_case else None
        std = cases.get(("standard", "layer", ""))
        std_n = cases.get(("standard", "neurons", ""))
        ds = sorted(
            {int(d) for impl, scope, d in cases if impl == "dblock" and scope in SCOPES_LAYER}
        )
        for d in ds:
            lay = cases.get(("dblock", "layer", str(d)))
            neu = cases.get(("dblock", "neurons", str(d)))

            def ratio(a, b):
                return a[0] / b[0] if a and b else None

            others = [ratio(cases.get((o, "layer", "")), lay) for o in OTHERS]
            mem = lay[1] / std[1] if lay and std and std[1] > 0 else None
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {d} | {_fmt(floor, 0)} | "
                f"{_fmt(lay[0] / floor if lay and floor else None, 3)} | "
                f"{_fmt(ratio(std, lay))} | {_fmt(ratio(std_n, neu))} | "
                + " | ".join(_fmt(o) for o in others)
                + f" | {_fmt(mem)} | {_ops(lay)} | {_ops(std)} | "
                f"{_bytes_ratio(lay, floor_case)} |"
            )
    return "\n".join(lines)


STEP_INPUTS = {"step": "dense", "step_sparse": "sparse"}  # whole-step scope -> input path


def step_table(points: dict) -> str:
    """One row per point, input path (dense: scope ``step``; sparse: ``step_sparse``) and d that
    has whole-step rows; empty if none. Both paths are reported against the dense floor."""
    head = (
        "| mode | input | T | n | d | floor ms | projection ms | dblock step ms | "
        "dblock step/floor | standard step/floor | speedup step (std/dblock) | data ms | "
        "data/dblock step |"
    )
    lines = []
    for key in sorted(points):
        cases = points[key]
        floor = cases.get(("floor", "step", ""), (None,))[0]
        for scope, inp in STEP_INPUTS.items():
            proj = floor if inp == "dense" else cases.get(("projection", scope, ""), (None,))[0]
            std = cases.get(("standard", scope, ""), (None,))[0]
            data = cases.get(("data", scope, ""), (None,))[0]
            ds = sorted({int(d) for impl, sc, d in cases if impl == "dblock" and sc == scope})
            for d in ds:
                db = cases[("dblock", scope, str(d))][0]
                lines.append(
                    f"| {key[1]} | {inp} | {key[2]} | {key[3]} | {d} | {_fmt(floor, 0)} | "
                    f"{_fmt(proj, 1)} | {_fmt(db, 0)} | "
                    f"{_fmt(db / floor if floor else None)} | "
                    f"{_fmt(std / floor if std and floor else None)} | "
                    f"{_fmt(std / db if std else None)} | {_fmt(data, 1)} | "
                    f"{_fmt(100 * data / db if data else None, 1)} % |"
                )
    if not lines:
        return ""
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *lines])


def _bytes_ratio(case: tuple | None, floor: tuple | None) -> str:
    """The bytes moved of ``case`` over the floor's, or "-"."""
    if not case or not floor or not case[3] or not floor[3]:
        return "-"
    return f"{case[3] / floor[3]:.2f}"


def _ops(case: tuple | None) -> str:
    return "-" if case is None or case[2] is None else str(case[2])


def kernel_table(points: dict) -> str | None:
    """Chunked over loop kernel, per point and d; None when the CSV does not hold both."""
    head = (
        "| panel | mode | T | n | d | chunked/loop layer | chunked/loop neurons | ops loop | "
        "ops chunked |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(points):
        cases = points[key]
        for d in sorted({int(d) for impl, _, d in cases if impl == "dblock_loop"}):
            get = {
                (impl, scope): cases.get((f"dblock_{impl}", scope, str(d)))
                for impl in ("loop", "chunked")
                for scope in ("layer", "neurons")
            }
            if get["chunked", "layer"] is None and get["chunked", "neurons"] is None:
                continue
            ratios = [
                _fmt(get["chunked", s][0] / get["loop", s][0])
                if get["chunked", s] and get["loop", s]
                else "-"
                for s in ("layer", "neurons")
            ]
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {d} | {ratios[0]} | {ratios[1]} | "
                f"{_ops(get['loop', 'layer'])} | {_ops(get['chunked', 'layer'])} |"
            )
    return "\n".join(lines) if len(lines) > 2 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("csv")
    points = load(p.parse_args(argv).csv)
    print(table(points))
    kernels = kernel_table(points)
    if kernels:
        print("\n" + kernels)
    steps = step_table(points)
    if steps:
        print("\nWhole training step (model + loss + Adam) on batches from the SHD datamodule:\n")
        print(steps)


if __name__ == "__main__":
    main()
