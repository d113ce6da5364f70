"""Fig. 3 heatmaps (training speedup of a d-block layer over the standard layer) from the speed
benchmark's CSV, beside the paper's values (docs/model.md §7).

    python -m experiments.plot_fig3 outputs/bench_speed.csv --out outputs/figures
    python -m experiments.plot_fig3 outputs/bench_speed.csv --wandb   # also to one wandb run

For every panel (a-d) and device in the CSV: speedup = standard time / d-block time at the same
panel, mode, scope, t_len, n_hidden and device (the median over repeated rows), as a d x t
(a, c) or d x n (b, d) heatmap. Panel a's cells also show the paper's value where it has one.
Writes fig3<panel>_<device>.png and .md (our table, the paper's values or range).
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from experiments import paper_values as paper  # noqa: E402
from experiments.figtools import add_wandb_options, log_to_wandb, markdown_table, save  # noqa: E402

log = logging.getLogger("figures")
COLUMNS = ("panel", "mode", "impl", "scope", "d", "t_len", "n_hidden", "device", "time_ms")
AXIS = {"a": "t_len", "b": "n_hidden", "c": "t_len", "d": "n_hidden"}


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark CSV at {path}: run experiments/bench_speed.py first")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path} has no rows or lacks the columns {missing}")
    return rows


def speedups(rows: list[dict], scope: str) -> dict[tuple[str, str], dict[tuple[int, int], float]]:
    """{(panel, device): {(d, x): standard time / d-block time}}, x = t_len or n_hidden."""
    times: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["scope"] == scope and r["panel"] in AXIS and r["impl"] in ("dblock", "standard"):
            x = int(r[AXIS[r["panel"]]])
            d = int(r["d"]) if r["impl"] == "dblock" else None
            times[(r["panel"], r["mode"], r["device"], x, r["impl"], d)].append(float(r["time_ms"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[tuple[str, str], dict] = defaultdict(dict)
    for (panel, mode, device, x, impl, d), t in med.items():
        std = med.get((panel, mode, device, x, "standard", None))
        if impl == "dblock" and std is not None:
            out[(panel, device)][(d, x)] = std / t
    return out


def heatmap(panel: str, device: str, grid: dict[tuple[int, int], float], scope: str):
    ds = sorted({d for d, _ in grid})
    xs = sorted({x for _, x in grid})
    values = np.array([[grid.get((d, x), np.nan) for x in xs] for d in ds])
    ref = paper.FIG3A if panel == "a" else {}
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(xs), 1.0 + 0.55 * len(ds)))
    finite = values[np.isfinite(values)]
    norm = (
        LogNorm(vmin=max(finite.min(), 1e-2), vmax=max(finite.max(), 1.0)) if finite.size else None
    )
    im = ax.imshow(values, cmap="viridis", norm=norm, aspect="auto", origin="lower")
    for i, d in enumerate(ds):
        for j, x in enumerate(xs):
            if np.isfinite(values[i, j]):
                text = f"{values[i, j]:.1f}"
                if ref.get(d, {}).get(x) is not None:
                    text += f"\n({ref[d][x]:g})"
                light = norm is not None and norm(values[i, j]) > 0.6
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="k" if light else "w"
                )
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ds)), [str(d) for d in ds])
    ax.set(
        xlabel="t (time steps)" if AXIS[panel] == "t_len" else "n (neurons)",
        ylabel="d",
        title=f"Fig. 3{panel}, {device}, {scope}: speedup" + (", ours (paper)" if ref else ""),
    )
    fig.colorbar(im, ax=ax, label="standard / d-block time")
    rows = [
        [d]
        + [
            f"{grid[(d, x)]:.2f}" + (f" ({ref[d][x]:g})" if ref.get(d, {}).get(x) else "")
            if (d, x) in grid
            else "—"
            for x in xs
        ]
        for d in ds
    ]
    table = markdown_table([f"d \\ {'t' if AXIS[panel] == 't_len' else 'n'}", *map(str, xs)], rows)
    lo, hi = paper.FIG3_RANGE[panel]
    table += (
        f"\nOurs: {finite.min():.2f}x to {finite.max():.2f}x; paper (A100): {lo}x to {hi}x."
        + (" Cells: ours (paper)." if ref else "")
        + "\n"
    )
    return fig, table


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="the speed benchmark's CSV")
    parser.add_argument("--out", default="outputs/figures", help="folder for the PNGs and tables")
    parser.add_argument(
        "--scope",
        default="layer",
        choices=["layer", "neurons"],
        help="whole layer (paper) or neurons only",
    )
    add_wandb_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grids = speedups(read_csv(Path(args.csv)), args.scope)
    if not grids:
        raise ValueError(
            f"{args.csv} has no d-block/standard pairs for panels a-d, scope {args.scope}"
        )
    written, panels = [], []
    for (panel, device), grid in sorted(grids.items()):
        fig, table = heatmap(panel, device, grid, args.scope)
        suffix = "" if args.scope == "layer" else "_neurons"
        device = "".join(c if c.isalnum() else "_" for c in device)
        title = f"Fig. 3{panel}, {device}, {args.scope}"
        name = f"fig3{panel}_{device}{suffix}"
        png, md = save(fig, Path(args.out) / name, table, title)
        written += [png, md]
        panels.append((name, png, table, title))
        plt.close(fig)
        print(f"### {title}\n\n{table}")
    if args.wandb:
        log_to_wandb(panels, "fig3", args)
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
