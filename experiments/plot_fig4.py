"""Fig. 4 from a sweep folder's results.json files, beside the paper's values (SPEC §7).

    python experiments/plot_fig4.py a outputs/fig4/shd            # one panel
    python experiments/plot_fig4.py all outputs/fig4/shd --out outputs/figures

Panels: a (accuracy vs d, feedforward and recurrent), b (d = 40, detached vs attached),
c (d = 40, 1-3 layers), d (epoch-time speedup over the standard recurrent SNN) and e (hidden
spike reduction vs the standard SNN); d and e pair each recurrent 1-layer d-block run with the
standard run of the same dataset and seed. Writes fig4<panel>_<dataset>.png and .md (a table of
ours, mean ± s.d. over seeds, vs the paper) per dataset found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_values as paper  # noqa: E402
from figtools import aggregate, fmt, load_results, markdown_table, paper_fmt, save  # noqa: E402

log = logging.getLogger("figures")
PANELS = ("a", "b", "c", "d", "e")


def dblock_runs(recs, **match):
    return [r for r in recs if r["model"] == "dblock" and all(r[k] == v for k, v in match.items())]


def pct(r: dict) -> float:
    return 100.0 * r["test/acc"]


def panel_a(recs, ds, ref_ds):
    fig, ax = plt.subplots(figsize=(5, 3.6))
    rows, names = [], {False: "feedforward", True: "recurrent"}
    for i, rec in enumerate((False, True)):
        runs = [
            r
            for r in dblock_runs(recs, layers=1, recurrent=rec)
            if r["detach_recurrent"] or not rec
        ]
        ours = aggregate(runs, lambda r: r["d"], pct)
        ref = paper.by_d(paper.FIG4A.get(ref_ds, {}).get(rec))
        color = f"C{i}"
        if ours:
            ds_ = list(ours)
            ax.errorbar(
                ds_,
                [ours[d][0] for d in ds_],
                [ours[d][1] for d in ds_],
                color=color,
                marker="o",
                capsize=3,
                label=f"{names[rec]} (ours)",
            )
        if ref:
            ax.plot(
                list(ref),
                list(ref.values()),
                "--",
                color=color,
                marker="x",
                alpha=0.7,
                label=f"{names[rec]} (paper)",
            )
        for d in sorted(set(ours) | set(ref)):
            rows.append([names[rec], d, fmt(*ours[d]) if d in ours else "—", paper_fmt(ref.get(d))])
    ax.set(xlabel="d", ylabel="test accuracy (%)", title=f"Fig. 4a, {ds}")
    ax.legend(fontsize=7)
    return fig, markdown_table(["layer", "d", "ours acc (%)", "paper acc (%)"], rows)


def bars(ax, labels, ours, ref, ylabel):
    """Grouped bars: ours (with s.d.) and the paper's value beside it (hatched)."""
    xs = range(len(labels))
    ax.bar(
        [x - 0.2 for x in xs],
        [ours[k][0] if k in ours else 0 for k in labels],
        0.4,
        yerr=[ours[k][1] if k in ours else 0 for k in labels],
        capsize=3,
        label="ours",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [ref.get(k) or 0 for k in labels],
        0.4,
        hatch="//",
        fill=False,
        edgecolor="gray",
        label="paper",
    )
    ax.set_xticks(list(xs), [str(k) for k in labels])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def panel_b(recs, ds, ref_ds, d=40):
    runs = dblock_runs(recs, layers=1, recurrent=True, d=d)
    ours = aggregate(runs, lambda r: r["detach_recurrent"], pct)
    ref = paper.FIG4B.get(ref_ds, {})
    fig, ax = plt.subplots(figsize=(4, 3.6))
    bars(ax, [True, False], ours, ref, "test accuracy (%)")
    ax.set_xticks([0, 1], ["detached", "attached"])
    ax.set_title(f"Fig. 4b, {ds}, d={d}")
    rows = [
        [name, fmt(*ours[k]) if k in ours else "—", paper_fmt(ref.get(k))]
        for k, name in ((True, "detached"), (False, "attached"))
    ]
    return fig, markdown_table(["recurrent spikes", "ours acc (%)", "paper acc (%)"], rows)


def panel_c(recs, ds, ref_ds, d=40):
    runs = [r for r in dblock_runs(recs, recurrent=True, d=d) if r["detach_recurrent"]]
    ours = aggregate(runs, lambda r: r["layers"], pct)
    ref = paper.FIG4C.get(ref_ds, {})
    layers = sorted(set(ours) | set(ref))
    fig, ax = plt.subplots(figsize=(4, 3.6))
    bars(ax, layers, ours, ref, "test accuracy (%)")
    ax.set(xlabel="hidden layers", title=f"Fig. 4c, {ds}, d={d}")
    rows = [[n, fmt(*ours[n]) if n in ours else "—", paper_fmt(ref.get(n))] for n in layers]
    return fig, markdown_table(["hidden layers", "ours acc (%)", "paper acc (%)"], rows)


def paired(recs):
    """(d-block run, standard run) pairs: recurrent, 1 layer, same dataset, n_hidden and seed."""
    std = {
        (r["n_hidden"], r["seed"]): r
        for r in recs
        if r["model"] == "standard" and r["recurrent"] and r["layers"] == 1
    }
    pairs = [
        (r, std[(r["n_hidden"], r["seed"])])
        for r in dblock_runs(recs, layers=1, recurrent=True, detach_recurrent=True)
        if (r["n_hidden"], r["seed"]) in std
    ]
    if not pairs:
        raise ValueError(
            "no d-block run has a standard run of the same seed to pair with: run "
            "the fig4d (or fig4e) sweep into the same folder as fig4a's"
        )
    return pairs


def speedup(pair: tuple[dict, dict]) -> float:
    """Standard epoch time / d-block epoch time (first epochs excluded by run.py)."""
    return pair[1]["train/epoch_time_s"] / pair[0]["train/epoch_time_s"]


def spike_reduction(pair: tuple[dict, dict]) -> float:
    """1 - spikes(d-block) / spikes(standard), in %."""
    return 100 * (1 - pair[0]["test/spikes_per_sample"] / pair[1]["test/spikes_per_sample"])


def panel_line(recs, ds, ref_ds, which):
    if which == "d":
        value = speedup
        ref, label, digits = paper.by_d(paper.FIG4D.get(ref_ds)), "epoch-time speedup (x)", 2
    else:
        value = spike_reduction
        ref, label, digits = paper.by_d(paper.FIG4E.get(ref_ds)), "spike reduction (%)", 1
    ours = aggregate(paired(recs), lambda p: p[0]["d"], value)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = list(ours)
    ax.errorbar(
        xs, [ours[d][0] for d in xs], [ours[d][1] for d in xs], marker="o", capsize=3, label="ours"
    )
    known = {d: v for d, v in ref.items() if v is not None}
    if known:
        ax.plot(list(known), list(known.values()), "--", marker="x", color="gray", label="paper")
    ax.axhline(1.0 if which == "d" else 0.0, color="k", lw=0.5)
    ax.set(xlabel="d", ylabel=label, title=f"Fig. 4{which}, {ds}, vs standard recurrent SNN")
    ax.legend(fontsize=7)
    rows = [
        [d, fmt(*ours[d], digits) if d in ours else "—", paper_fmt(ref.get(d), digits)]
        for d in sorted(set(ours) | set(ref))
    ]
    return fig, markdown_table(["d", f"ours {label}", f"paper {label}"], rows)


def plot(panel: str, recs: list[dict], ds: str, ref_ds: str, d: int = 40):
    """The figure and markdown table of one panel for the runs ``recs`` of dataset ``ds``."""
    if panel == "a":
        return panel_a(recs, ds, ref_ds)
    if panel == "b":
        return panel_b(recs, ds, ref_ds, d)
    if panel == "c":
        return panel_c(recs, ds, ref_ds, d)
    return panel_line(recs, ds, ref_ds, panel)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("panel", choices=[*PANELS, "all"])
    parser.add_argument("runs", nargs="+", help="sweep folder(s) holding results.json files")
    parser.add_argument("--out", default="outputs/figures", help="folder for the PNGs and tables")
    parser.add_argument("--d", type=int, default=40, help="d of panels b and c (paper: 40)")
    parser.add_argument(
        "--paper",
        default=None,
        help="compare with this dataset's paper values (default: the runs' own)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recs = load_results(args.runs)
    written = []
    for ds in sorted({r["dataset"] for r in recs}):
        mine = [r for r in recs if r["dataset"] == ds]
        ref_ds = args.paper or ds
        for panel in PANELS if args.panel == "all" else (args.panel,):
            try:
                fig, table = plot(panel, mine, ds, ref_ds, args.d)
            except ValueError as err:
                if args.panel != "all":
                    raise
                log.warning("Fig. 4%s, %s skipped: %s", panel, ds, err)
                continue
            title = f"Fig. 4{panel}, {ds}" + (f" (paper values: {ref_ds})" if ref_ds != ds else "")
            written += save(fig, Path(args.out) / f"fig4{panel}_{ds}", table, title)
            plt.close(fig)
            print(f"### {title}\n\n{table}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
