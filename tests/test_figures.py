"""Figure scripts on fixture folders: results.json files (Fig. 4) and a benchmark CSV (Fig. 3)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
ACC = {0: 0.70, 1: 0.72, 2: 0.74}  # per seed: mean 72.0, s.d. 2.0


def result(path: Path, **cfg) -> None:
    rec = {
        "test/acc": ACC[cfg["seed"]] - (0.1 if cfg.get("model") == "standard" else 0.0),
        "test/loss": 1.0,
        "test/spikes_per_sample": 30.0,
        "train/epoch_time_s": 2.0,
        "epoch": 3,
        "n_classes": 20,
        "model": "dblock",
        "d": 10,
        "layers": 1,
        "n_hidden": 128,
        "recurrent": True,
        "detach_recurrent": True,
        "dataset": "shd",
        "seed": 0,
        "wall_time_s": 9.0,
    }
    rec.update(cfg)
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(rec))


def write_sweep(root: Path, dataset: str = "shd", parts: str = "abcs") -> Path:
    """results.json files of 3 seeds: 4a's grid (a), 4b's attached runs (b), 4c's 2- and 3-layer
    runs (c) and the standard runs of 4d/4e (s)."""
    for s in SEEDS:
        if "a" in parts:
            for d in (1, 10, 40):
                for rec in (False, True):
                    result(root / f"a-d{d}-{rec}-{s}", d=d, recurrent=rec, seed=s, dataset=dataset)
        if "b" in parts:
            result(root / f"b-{s}", d=40, detach_recurrent=False, seed=s, dataset=dataset)
        if "c" in parts:
            for n in (2, 3):
                result(root / f"c-{n}-{s}", d=40, layers=n, seed=s, dataset=dataset)
        if "s" in parts:
            result(
                root / f"std-{s}",
                model="standard",
                d=None,
                seed=s,
                dataset=dataset,
                **{"train/epoch_time_s": 10.0, "test/spikes_per_sample": 100.0},
            )
    return root


@pytest.fixture
def sweep(tmp_path) -> Path:
    return write_sweep(tmp_path / "fig4" / "shd")


def plot(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{Path(script).stem}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fig4_all_panels(sweep, tmp_path):
    out = tmp_path / "figs"
    plot("plot_fig4.py", "all", str(sweep), "--out", str(out))
    for panel in "abcde":
        png = out / f"fig4{panel}_shd.png"
        assert png.is_file() and png.stat().st_size > 1000, panel
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a = (out / "fig4a_shd.md").read_text()
    assert "| recurrent | 10 | 72.0 ± 2.0 (n=3) | 73.5 |" in a  # mean ± s.d. vs the paper
    assert "| feedforward | 40 | 72.0 ± 2.0 (n=3) | 69.4 |" in a
    assert "| recurrent | 20 | — | 74.8 |" in a  # the paper's point we lack
    b = (out / "fig4b_shd.md").read_text()
    assert "| attached | 72.0 ± 2.0 (n=3) | 73.4 |" in b
    c = (out / "fig4c_shd.md").read_text()
    assert "| 3 | 72.0 ± 2.0 (n=3) | 82.9 |" in c
    d = (out / "fig4d_shd.md").read_text()
    assert "| 10 | 5.00 ± 0.00 (n=3) | 7.00 |" in d  # 10 s / 2 s, paired by seed
    e = (out / "fig4e_shd.md").read_text()
    assert "| 40 | 70.0 ± 0.0 (n=3) | 59.0 |" in e  # 1 - 30/100


def test_fig4_pairs_by_seed(sweep, tmp_path):
    std = json.loads((sweep / "std-1" / "results.json").read_text())
    std["train/epoch_time_s"] = 4.0  # seed 1: speedup 2 instead of 5
    (sweep / "std-1" / "results.json").write_text(json.dumps(std))
    plot("plot_fig4.py", "d", str(sweep), "--out", str(tmp_path))
    assert "| 1 | 4.00 ± 1.73 (n=3) | 5.00 |" in (tmp_path / "fig4d_shd.md").read_text()


def test_fig4_without_standard_runs_is_a_clear_error(sweep, tmp_path):
    for s in SEEDS:
        (sweep / f"std-{s}" / "results.json").unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-m", "experiments.plot_fig4",
            "e",
            str(sweep),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "fig4d" in proc.stderr and "Traceback" not in proc.stderr


def fig4():
    """experiments/plot_fig4.py as a module (in-process: no interpreter start per test)."""
    from experiments import plot_fig4

    return plot_fig4


def test_fig4_all_draws_only_panels_with_their_own_runs(tmp_path, caplog):
    """4a's and 4d's sweeps only (the README's quick try): a, d and e are drawn; b and c are
    not (no empty "attached" bar) and the log says which runs they lack."""
    plot_fig4 = fig4()
    runs = write_sweep(tmp_path / "runs", parts="as")
    out = tmp_path / "figs"
    with caplog.at_level("WARNING", logger="figures"):
        written = plot_fig4.main(["all", str(runs), "--out", str(out)])
    assert sorted(p.name for p in written if p.suffix == ".png") == [
        "fig4a_shd.png", "fig4d_shd.png", "fig4e_shd.png"]
    assert "Fig. 4b, shd not drawn: no attached runs at d=40" in caplog.text
    assert "experiment=fig4b_shd" in caplog.text
    assert "Fig. 4c, shd not drawn: no runs with 2 or 3 hidden layers" in caplog.text
    with pytest.raises(plot_fig4.MissingRuns, match="4b, shd not drawn: no attached runs"):
        plot_fig4.main(["b", str(runs), "--out", str(out)])  # one panel asked for: an error
    with pytest.raises(plot_fig4.MissingRuns, match="no Fig. 4 panel has its runs"):
        plot_fig4.main(["all", str(write_sweep(tmp_path / "std", parts="s")), "--out", str(out)])


def test_fig4_notes_missing_points(tmp_path, caplog):
    plot_fig4 = fig4()
    runs = write_sweep(tmp_path / "runs", parts="acs")
    for s in SEEDS:
        for name in (f"a-d10-False-{s}", f"c-3-{s}"):
            (runs / name / "results.json").unlink()
    result(runs / "lone", d=10, seed=1, n_hidden=64)  # no standard run of that size
    with caplog.at_level("WARNING", logger="figures"):
        plot_fig4.main(["all", str(runs), "--out", str(tmp_path / "figs")])
    assert "Fig. 4a, shd: feedforward lacks d=10 (the other has them)" in caplog.text
    assert "Fig. 4c, shd: no 3-layer runs" in caplog.text
    assert "4d, shd: no standard run (n_hidden=64, seed=1) to pair with d=10" in caplog.text


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_fig4_bars_without_paper_values_have_no_paper_entry(tmp_path):
    """bursts has no paper values: panel b shows our two bars only, no empty hatched ones."""
    plot_fig4 = fig4()
    recs = plot_fig4.load_results([write_sweep(tmp_path / "runs", "bursts")])
    for panel in "bc":
        fig, table, _ = plot_fig4.plot(panel, recs, "bursts", "bursts")
        assert legend(fig) == ["ours"], panel
        heights = [p.get_height() for p in fig.axes[0].patches]
        assert len(heights) == (2 if panel == "b" else 3) and min(heights) > 0, panel
        assert "—" in table  # the paper column


def test_fig4_paper_of_another_dataset_is_named(tmp_path):
    """--paper shd on bursts runs: every PNG's title and legend name SHD, and so does the .md."""
    plot_fig4 = fig4()
    runs = write_sweep(tmp_path / "runs", "bursts")
    recs = plot_fig4.load_results([runs])
    for panel in "abcde":
        fig, _, _ = plot_fig4.plot(panel, recs, "bursts", "shd")
        head = fig.axes[0].get_title()
        assert head.startswith(f"Fig. 4{panel}, bursts") and "(paper values: SHD)" in head, head
        assert any(t.endswith("(paper, SHD)") or t == "paper, SHD" for t in legend(fig)), panel
        assert not any(t.endswith("(paper)") for t in legend(fig))
    out = tmp_path / "figs"
    plot_fig4.main(["b", str(runs), "--out", str(out), "--paper", "shd"])
    md = (out / "fig4b_bursts.md").read_text()
    assert md.startswith("## Fig. 4b, bursts, d=40 (paper values: SHD)")
    assert "| attached | 72.0 ± 2.0 (n=3) | 73.4 |" in md


def write_speed_csv(path: Path) -> Path:
    """A benchmark CSV: panels a and d, d-block 10 d ms vs standard 100 ms (speedup 10 / d)."""
    cols = [
        "panel",
        "mode",
        "impl",
        "scope",
        "d",
        "t_len",
        "n_hidden",
        "n_in",
        "batch",
        "device",
        "time_ms",
        "peak_mem_mb",
    ]
    rows = []
    for panel, mode, xs in (("a", "feedforward", (32, 2048)), ("d", "recurrent", (100, 200))):
        for x in xs:
            t, n = (x, 100) if panel == "a" else (512, x)
            base = dict(
                panel=panel,
                mode=mode,
                scope="layer",
                t_len=t,
                n_hidden=n,
                n_in=1000,
                batch=128,
                device="cpu",
                peak_mem_mb=1.0,
            )
            rows.append({**base, "impl": "standard", "d": "", "time_ms": 100.0})
            rows.append({**base, "impl": "snntorch", "d": "", "time_ms": 300.0})
            rows.append({**base, "impl": "floor", "d": "", "time_ms": 1.0})
            for d in (5, 10, 30):
                rows.append({**base, "impl": "dblock", "d": d, "time_ms": 10.0 * d})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_fig3_heatmaps(tmp_path):
    path = write_speed_csv(tmp_path / "speed.csv")
    out = tmp_path / "figs"
    plot("plot_fig3.py", str(path), "--out", str(out))
    for name in ("fig3a_cpu", "fig3d_cpu"):
        assert (out / f"{name}.png").stat().st_size > 1000
    a = (out / "fig3a_cpu.md").read_text()
    assert "| 5 | 2.00 (1.6) | 2.00 (21) |" in a  # 100 / (10 * 5), paper value
    assert "| 30 | 0.33 (0.4) | 0.33 (33) |" in a
    assert "paper (A100): 0.4x to 34.8x" in a
    assert "| 10 | 1.00 | 1.00 |" in (out / "fig3d_cpu.md").read_text()


def test_fig3_bad_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("panel,mode\na,feedforward\n")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.plot_fig3", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "lacks the columns" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aggregate_mean_sd_in_numeric_order():
    from experiments.figtools import aggregate

    recs = [{"d": d, "v": v} for d, v in ((40, 1.0), (5, 2.0), (5, 4.0), (10, 3.0))]
    out = aggregate(recs, lambda r: r["d"], lambda r: r["v"])
    assert list(out) == [5, 10, 40]
    assert out[5][0] == 3.0 and abs(out[5][1] - 2**0.5) < 1e-12 and out[5][2] == 2
    assert out[40] == (1.0, 0.0, 1)


def wandb_tables(run: Path) -> dict[str, dict]:
    """{panel name: the logged table (columns, data)} of an offline wandb run folder."""
    tables = (run / "files" / "media" / "table").glob("*/table_*.table.json")
    return {p.parent.name: json.loads(p.read_text()) for p in tables}


def test_figures_logged_to_one_offline_wandb_run(tmp_path, monkeypatch):
    """--wandb: each panel's image and its table of ours vs paper, in one run grouped
    "figures", offline with no account (no key, no netrc) and no network."""
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "figs"
    speed = write_speed_csv(tmp_path / "speed.csv")
    plot("plot_fig3.py", str(speed), "--out", str(out), "--wandb")
    plot("plot_fig4.py", "all", str(write_sweep(tmp_path / "shd")), "--out", str(out), "--wandb")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one run per script call
    fig3, fig4 = (wandb_tables(r) for r in runs)
    assert set(fig3) == {"fig3a_cpu", "fig3d_cpu"}
    assert set(fig4) == {f"fig4{p}_shd" for p in "abcde"}
    for tables in (fig3, fig4):
        for name, table in tables.items():  # the same rows as the .md table beside the PNG
            md = (out / f"{name}.md").read_text()
            lines = [f"| {' | '.join(row)} |" for row in [table["columns"], *table["data"]]]
            assert all(line in md for line in lines) and len(table["data"]) >= 2, name
    assert ["5", "2.00 (1.6)", "2.00 (21)"] in fig3["fig3a_cpu"]["data"]
    assert ["attached", "72.0 ± 2.0 (n=3)", "73.4"] in fig4["fig4b_shd"]["data"]
    for run, tables in zip(runs, (fig3, fig4), strict=True):
        images = {p.parent.name for p in (run / "files" / "media" / "images").glob("*/panel_*.png")}
        assert images == set(tables)
        record = next(run.glob("*.wandb")).read_bytes()
        assert b"figures" in record  # the group
