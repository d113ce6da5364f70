"""Fig. 4 from a sweep folder's results.json files, beside the paper's values (docs/model.md §7).

    python -m experiments.plot_fig4 a outputs/fig4/shd            # one panel
    python -m experiments.plot_fig4 all outputs/fig4/shd --out outputs/figures
    python -m experiments.plot_fig4 all outputs/fig4/shd --wandb  # also to one wandb run

Panels: a (accuracy vs d, feedforward and recurrent), b (d = 40, detached vs attached),
c (d = 40, 1-3 layers), d (epoch-time speedup over the standard recurrent SNN) and e (hidden
spike reduction vs the standard SNN); d and e pair each recurrent 1-layer d-block run with the
standard run of the same dataset and seed. Writes fig4<panel>_<dataset>.png and .md (a table of
ours, mean ± s.d. over seeds, vs the paper) per dataset found. A panel is drawn only when its
own runs are there (``all`` says which panels it skipped, and why); ``--paper shd`` compares
with another dataset's paper values (e.g. runs on the embedded ``bursts``), naming it in the
title and legend.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import paper_values as paper  # noqa: E402
from experiments.figtools import (  # noqa: E402
    add_wandb_options,
    aggregate,
    fmt,
    load_results,
    log_to_wandb,
    markdown_table,
    paper_fmt,
    save,
)

log = logging.getLogger("figures")
PANELS = ("a", "b", "c", "d", "e")
LAYER = {False: "feedforward", True: "recurrent"}


class MissingRuns(ValueError):
    """The runs a panel is made of are not in the folder: the panel is not drawn."""


def experiment(panel: str, ds: str) -> str:
    """The sweep command that trains ``panel``'s runs for dataset ``ds``."""
    name = f"fig4{panel}_{ds}" if ds in paper.NAMES else f"fig4{panel}_shd dataset={ds}"
    return f"python run.py -m experiment={name}"


def paper_tag(ref_ds: str) -> str:
    """Legend text of the paper's values: names the dataset they belong to."""
    return f"paper, {paper.NAMES.get(ref_ds, ref_ds)}"


def title(text: str, ds: str, ref_ds: str) -> str:
    """``Fig. 4<text>`` for dataset ``ds``; names the paper's dataset when it is another one."""
    vs = f" (paper values: {paper.NAMES.get(ref_ds, ref_ds)})" if ref_ds != ds else ""
    return f"Fig. 4{text.format(ds=ds)}{vs}"


def dblock_runs(recs, **match):
    return [r for r in recs if r["model"] == "dblock" and all(r[k] == v for k, v in match.items())]


def pct(r: dict) -> float:
    return 100.0 * r["test/acc"]


def known(ref: dict) -> dict:
    return {k: v for k, v in ref.items() if v is not None}


def panel_a(recs, ds, ref_ds):
    series = {
        rec: aggregate(
            [r for r in dblock_runs(recs, layers=1, recurrent=rec) if r["detach_recurrent"]],
            lambda r: r["d"],
            pct,
        )
        for rec in (False, True)
    }
    absent = [LAYER[rec] for rec, ours in series.items() if not ours]
    if absent:
        raise MissingRuns(f"no {' and no '.join(absent)} d-block runs (one hidden layer)")
    notes = [
        f"{LAYER[rec]} lacks d={', '.join(map(str, gap))} (the other has them)"
        for rec, ours in series.items()
        if (gap := sorted(set(series[not rec]) - set(ours)))
    ]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    rows = []
    for i, (rec, ours) in enumerate(series.items()):
        ref = known(paper.by_d(paper.FIG4A.get(ref_ds, {}).get(rec)))
        ds_ = list(ours)
        ax.errorbar(ds_, [ours[d][0] for d in ds_], [ours[d][1] for d in ds_], color=f"C{i}",
                    marker="o", capsize=3, label=f"{LAYER[rec]} (ours)")
        if ref:
            ax.plot(list(ref), list(ref.values()), "--", color=f"C{i}", marker="x", alpha=0.7,
                    label=f"{LAYER[rec]} ({paper_tag(ref_ds)})")
        for d in sorted(set(ours) | set(ref)):
            rows.append([LAYER[rec], d, fmt(*ours[d]) if d in ours else "—", paper_fmt(ref.get(d))])
    ax.set(xlabel="d", ylabel="test accuracy (%)", title=title("a, {ds}", ds, ref_ds))
    ax.legend(fontsize=7)
    return fig, markdown_table(["layer", "d", "ours acc (%)", "paper acc (%)"], rows), notes


def bars(ax, keys, names, ours, ref, ref_ds, ylabel):
    """Grouped bars: ours (with s.d.) for ``keys``, the paper's value beside each it has."""
    xs = list(range(len(keys)))
    ax.bar([x - 0.2 for x in xs], [ours[k][0] for k in keys], 0.4,
           yerr=[ours[k][1] for k in keys], capsize=3, label="ours")
    have = [(x, ref[k]) for x, k in zip(xs, keys, strict=True) if ref.get(k) is not None]
    if have:
        ax.bar([x + 0.2 for x, _ in have], [v for _, v in have], 0.4, hatch="//", fill=False,
               edgecolor="gray", label=paper_tag(ref_ds))
    ax.set_xticks(xs, names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def panel_b(recs, ds, ref_ds, d=40):
    ours = aggregate(dblock_runs(recs, layers=1, recurrent=True, d=d),
                     lambda r: r["detach_recurrent"], pct)
    kinds = ((True, "detached"), (False, "attached"))
    absent = [name for k, name in kinds if k not in ours]
    if absent:
        raise MissingRuns(f"no {' and no '.join(absent)} runs at d={d} (recurrent, one layer)")
    ref = known(paper.FIG4B.get(ref_ds, {}))
    fig, ax = plt.subplots(figsize=(4, 3.6))
    bars(ax, [k for k, _ in kinds], [n for _, n in kinds], ours, ref, ref_ds, "test accuracy (%)")
    ax.set_title(title(f"b, {{ds}}, d={d}", ds, ref_ds))
    rows = [[name, fmt(*ours[k]), paper_fmt(ref.get(k))] for k, name in kinds]
    return fig, markdown_table(["recurrent spikes", "ours acc (%)", "paper acc (%)"], rows), []


def panel_c(recs, ds, ref_ds, d=40):
    runs = [r for r in dblock_runs(recs, recurrent=True, d=d) if r["detach_recurrent"]]
    ours = aggregate(runs, lambda r: r["layers"], pct)
    if not any(n != 1 for n in ours):  # the 1-layer runs are 4a's; 4c adds the deeper ones
        raise MissingRuns(f"no runs with 2 or 3 hidden layers at d={d} (recurrent, detached)")
    ref = known(paper.FIG4C.get(ref_ds, {}))
    notes = [f"no {n}-layer runs" for n in sorted({1, 2, 3} | set(ref)) if n not in ours]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    bars(ax, list(ours), [str(n) for n in ours], ours, ref, ref_ds, "test accuracy (%)")
    ax.set(xlabel="hidden layers", title=title(f"c, {{ds}}, d={d}", ds, ref_ds))
    rows = [
        [n, fmt(*ours[n]) if n in ours else "—", paper_fmt(ref.get(n))]
        for n in sorted(set(ours) | set(ref))
    ]
    return fig, markdown_table(["hidden layers", "ours acc (%)", "paper acc (%)"], rows), notes


def paired(recs) -> tuple[list[tuple[dict, dict]], list[str]]:
    """(d-block run, standard run) pairs: recurrent, 1 layer, same dataset, n_hidden and seed;
    and notes on the d-block runs left without a partner."""

    def key(r: dict) -> tuple:
        return r["n_hidden"], r["seed"]

    std = {
        key(r): r for r in recs if r["model"] == "standard" and r["recurrent"] and r["layers"] == 1
    }
    runs = dblock_runs(recs, layers=1, recurrent=True, detach_recurrent=True)
    if not runs:
        raise MissingRuns("no recurrent d-block runs (one layer, detached) to compare")
    pairs = [(r, std[key(r)]) for r in runs if key(r) in std]
    if not pairs:
        raise MissingRuns(
            "no d-block run has a standard run of the same seed to pair with: run "
            "the fig4d (or fig4e) sweep into the same folder as fig4a's"
        )
    lone = sorted({(r["d"], *key(r)) for r in runs if key(r) not in std})
    notes = [f"no standard run (n_hidden={h}, seed={s}) to pair with d={d}" for d, h, s in lone]
    return pairs, notes


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
    pairs, notes = paired(recs)
    ours = aggregate(pairs, lambda p: p[0]["d"], value)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = list(ours)
    ax.errorbar(
        xs, [ours[d][0] for d in xs], [ours[d][1] for d in xs], marker="o", capsize=3, label="ours"
    )
    shown = known(ref)
    if shown:
        ax.plot(list(shown), list(shown.values()), "--", marker="x", color="gray",
                label=paper_tag(ref_ds))
    ax.axhline(1.0 if which == "d" else 0.0, color="k", lw=0.5)
    ax.set(xlabel="d", ylabel=label,
           title=title(f"{which}, {{ds}}, vs standard recurrent SNN", ds, ref_ds))
    ax.legend(fontsize=7)
    rows = [
        [d, fmt(*ours[d], digits) if d in ours else "—", paper_fmt(ref.get(d), digits)]
        for d in sorted(set(ours) | set(ref))
    ]
    return fig, markdown_table(["d", f"ours {label}", f"paper {label}"], rows), notes


def plot(panel: str, recs: list[dict], ds: str, ref_ds: str, d: int = 40):
    """(figure, markdown table, notes on missing runs) of one panel for the runs ``recs`` of
    dataset ``ds``, beside the paper's values for ``ref_ds``. Raises ``MissingRuns`` when the
    panel's own runs are not there."""
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
        choices=sorted(paper.NAMES),
        help="compare with this dataset's paper values (default: the runs' own)",
    )
    add_wandb_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recs = load_results(args.runs)
    written, skipped, panels = [], [], []
    for ds in sorted({r["dataset"] for r in recs}):
        mine = [r for r in recs if r["dataset"] == ds]
        ref_ds = args.paper or ds
        for panel in PANELS if args.panel == "all" else (args.panel,):
            try:
                fig, table, notes = plot(panel, mine, ds, ref_ds, args.d)
            except MissingRuns as err:
                why = f"Fig. 4{panel}, {ds} not drawn: {err}. Its runs: {experiment(panel, ds)}"
                if args.panel != "all":
                    raise MissingRuns(why) from None
                log.warning(why)
                skipped.append(why)
                continue
            for note in notes:
                log.warning("Fig. 4%s, %s: %s", panel, ds, note)
            head = fig.axes[0].get_title()
            png, md = save(fig, Path(args.out) / f"fig4{panel}_{ds}", table, head)
            written += [png, md]
            panels.append((f"fig4{panel}_{ds}", png, table, head))
            plt.close(fig)
            print(f"### {head}\n\n{table}")
    if not written:
        raise MissingRuns(f"no Fig. 4 panel has its runs under {', '.join(args.runs)}")
    if args.wandb:
        log_to_wandb(panels, "fig4", args)
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
