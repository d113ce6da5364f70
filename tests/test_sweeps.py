"""Sweeps you can compare and resume, runs that keep their history (real runs, signals, kills):
the sweep summary and plot, reruns that skip finished jobs and resume stopped ones, a rerun
after a crash that resumes, metrics.csv and the wandb run kept across resumes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dblock import sweeps
from tests.faults import RESUMABLE, TINY, fault, run_cli
from tests.test_reliability import same
from tests.test_run import ROOT, results
from tests.test_run import run as run_in_new_process

COLUMNS = [
    "job",
    "status",
    "test/acc",
    "test/loss",
    "test/spikes_per_sample",
    "train/epoch_time_s",
    "epochs",
    "wall_time_s",
]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_csv_columns(path: Path) -> list[str]:
    return list(read_csv(path)[0])


def epochs_logged(run_dir: Path) -> dict[str, list[int]]:
    """The epochs of metrics.csv's rows, per kind of row (train, val, test)."""
    rows = read_csv(run_dir / "csv" / "metrics.csv")
    return {
        kind: [int(float(r["epoch"])) for r in rows if r.get(f"{kind}/loss")]
        for kind in ("train", "val", "test")
    }


def snapshot(sweep: Path) -> dict:
    """Every job's results.json: bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/results.json")}


def test_two_job_sweep_writes_prints_and_plots_its_summary_and_a_rerun_redoes_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "d=1,5", *TINY, "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path)
    rows = read_csv(sweep / "summary.csv")
    assert list(rows[0]) == ["d", *COLUMNS]  # one column per swept key, named by the key
    assert [r["job"] for r in rows] == ["d=1", "d=5"]
    for row in rows:
        res = results(sweep / row["job"])
        assert row["d"] == str(res["d"]) and row["status"] == res["status"] == "ok"
        for key in ("test/acc", "test/loss", "test/spikes_per_sample", "train/epoch_time_s"):
            assert float(row[key]) == res[key], key
        assert int(row["epochs"]) == res["epoch"] == 2
        assert float(row["wall_time_s"]) == res["wall_time_s"]
    md = (sweep / "summary.md").read_text()
    table = md[md.index("| d |") :]
    assert table in proc.stdout  # printed at the end of the sweep
    assert f"| 1 | d=1 | ok | {results(sweep / 'd=1')['test/acc']:.4f} |" in table
    png = tmp_path / "acc.png"
    plot = subprocess.run(
        [sys.executable, "-m", "dblock.sweeps", "plot", str(sweep), "--x", "d", "--out", str(png)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    x, over, points = sweeps.sweep_points(sweep, "test/acc", "d")
    assert points == {None: [(d, results(sweep / f"d={d}")["test/acc"], 0.0, 1) for d in "15"]}

    # the same command again: no job runs, results.json untouched, each job says so
    before = snapshot(sweep)
    proc = run_cli(args, tmp_path)
    assert snapshot(sweep) == before
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped ")]
    assert skipped == [
        f"skipped {sweep / j}: done (results.json: ok; rerun=true runs it again)"
        for j in ("d=1", "d=5")
    ]
    assert "epoch 1/2" not in proc.stdout + proc.stderr and table in proc.stdout
    # other settings (a search's next trial, another lr) are not the job that is done, and its
    # checkpoint is not theirs to resume: refused with one line, nothing overwritten
    proc = run_cli([*args, "task.lr=0.002"], tmp_path, check=False)
    assert proc.returncode == 2 and "skipped" not in proc.stdout
    refusal = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert refusal and "task.lr=0.001" in refusal[0] and "rerun=true" in refusal[0], proc.stderr
    assert snapshot(sweep) == before
    # rerun=true runs every job again
    proc = run_cli([*args, "rerun=true"], tmp_path)
    assert "skipped" not in proc.stdout and proc.stdout.count("epoch 1/2") == 2
    assert all(snapshot(sweep)[p][1] > before[p][1] for p in before)


def test_summary_and_plot_of_any_sweep_folder(tmp_path):
    """A folder as a sweep leaves it (d x layers x seed, one job failed, one without results):
    the summary names every job with its status; the plot averages over seeds."""
    sweep = tmp_path / "sweep"
    accs = {(1, 1, 0): 0.5, (1, 1, 1): 0.7, (1, 2, 0): 0.6, (10, 1, 0): 0.8, (10, 1, 1): 0.9}
    jobs = [*accs, (10, 2, 0), (10, 2, 1)]
    for n, (d, layers, seed) in enumerate(jobs):
        job = sweep / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- d={d}\n- layers={layers}\n- seed={seed}\n- trainer.max_epochs=3\n"
        )
        status = "ok" if (d, layers, seed) in accs else "failed"
        if (d, layers, seed) == (10, 2, 1):
            continue  # killed before results.json
        (job / "results.json").write_text(
            json.dumps(
                {
                    "status": status,
                    "test/acc": accs.get((d, layers, seed)),
                    "test/loss": 1.0,
                    "test/spikes_per_sample": 3.0,
                    "train/epoch_time_s": 0.5,
                    "epoch": 3,
                    "wall_time_s": 9.0,
                }
            )
        )
    (sweep / "7").mkdir()  # not a job (no .hydra/overrides.yaml)
    table = sweeps.write_summary(sweep)
    rows = read_csv(sweep / "summary.csv")
    assert list(rows[0])[:4] == ["d", "layers", "seed", "job"]  # max_epochs is not swept
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed", "incomplete"]
    assert table.count("\n") == 2 + len(jobs)
    x, over, points = sweeps.sweep_points(sweep, "test/acc", "d", "layers")
    assert x == "d" and over == ["seed"]
    (l1_d1, l1_d10), (l2_d1,) = points["1"], points["2"]
    assert l1_d1[:2] == ("1", pytest.approx(0.6)) and l1_d1[2] == pytest.approx(0.1414, abs=1e-4)
    assert l1_d10[0] == "10" and l1_d10[1] == pytest.approx(0.85) and l1_d10[3] == 2
    assert l2_d1 == ("1", 0.6, 0.0, 1)
    assert sweeps.plot_sweep(sweep, "test/acc", "d", "layers").is_file()
    with pytest.raises(ValueError, match="--x lr is not a swept key .* choose one of: d, layers"):
        sweeps.sweep_points(sweep, "test/acc", "lr")
    bad = subprocess.run(
        [sys.executable, "-m", "dblock.sweeps", "summary", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such sweep folder")


def test_sweep_stopped_in_its_second_job_resumes_where_it_stopped(reference, tmp_path):
    """SIGTERM in the second job stops the sweep; the same command again leaves the first job
    untouched and gives the second the uninterrupted run's results (and its whole history)."""
    sweep = tmp_path / "sweep"
    stop = fault("SignalAt", epoch=1, job=1, unless_resumed=True)
    args = ["-m", "seed=1,0", *RESUMABLE, f"hydra.sweep.dir={sweep}", *stop]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert [r["status"] for r in read_csv(sweep / "summary.csv")] == ["ok", "interrupted"]
    first = {p: v for p, v in snapshot(sweep).items() if p.parent.name == "seed=1"}
    proc = run_cli(args, tmp_path)  # the same command
    assert {p: v for p, v in snapshot(sweep).items() if p.parent.name == "seed=1"} == first
    assert f"skipped {sweep / 'seed=1'}: done" in proc.stdout
    assert f"resuming from {sweep / 'seed=0' / 'checkpoints' / 'last.ckpt'} (1 epoch(s) saved" in (
        proc.stdout + proc.stderr
    )
    assert same(results(sweep / "seed=0"), results(reference))
    assert epochs_logged(sweep / "seed=0") == {"train": [0, 1, 2], "val": [0, 1, 2], "test": [3]}
    assert [r["status"] for r in read_csv(sweep / "summary.csv")] == ["ok", "ok"]


def test_rerun_after_kill_9_resumes_instead_of_starting_over(reference, tmp_path):
    """Issue 16 D1: the same command after kill -9 at epoch 3 of 3 (no ckpt_path, not under
    SLURM) resumes from the run dir's last.ckpt, says so, and ends as the uninterrupted run."""
    out = tmp_path / "run"
    args = [*RESUMABLE, f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("KillAt", epoch=2)], tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL
    proc = run_cli(args, tmp_path)
    said = f"resuming from {out / 'checkpoints' / 'last.ckpt'} (2 epoch(s) saved; rerun=true"
    assert said in proc.stdout + proc.stderr
    assert "epoch 1/3" not in proc.stdout and "epoch 3/3" in proc.stdout  # only epoch 3 trained
    assert "exists and is not empty" not in proc.stderr
    assert same(results(out), results(reference))
    assert epochs_logged(out) == {"train": [0, 1, 2], "val": [0, 1, 2], "test": [3]}


def test_metrics_history_kept_across_resumes_reruns_and_evaluations(reference, tmp_path):
    """metrics.csv holds every epoch once: after a SIGTERM and a resume, after a rerun of the
    finished run, after a resume from an earlier epoch's checkpoint, after an evaluation."""
    out = tmp_path / "run"
    args = [*RESUMABLE, f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1)], tmp_path, check=False)
    assert proc.returncode == 128 + signal.SIGTERM
    assert epochs_logged(out) == {"train": [0], "val": [0], "test": []}  # epoch 1 cut short
    run_cli(args, tmp_path)
    whole = {"train": [0, 1, 2], "val": [0, 1, 2], "test": [3]}
    assert epochs_logged(out) == whole and same(results(out), results(reference))
    run_cli(args, tmp_path)  # the finished run's command again: tested again, history kept
    assert epochs_logged(out) == whole
    best = out / "checkpoints" / "best.ckpt"  # epoch 1's (best.ckpt improves in epoch 0 only)
    run_cli([*args, f"ckpt_path={best}"], tmp_path)
    assert epochs_logged(out) == whole
    run_cli([*args, "train=false", f"ckpt_path={best}"], tmp_path)
    assert epochs_logged(out) == {**whole, "test": [3, 0]}  # the evaluation's row added


def test_kill_after_the_checkpoint_before_the_epoch_row_keeps_the_row(reference, tmp_path):
    """Lightning logs an epoch's training row after its checkpoints: a kill -9 right after
    last.ckpt is renamed loses the row from metrics.csv, and the resume adds it back from the
    checkpoint."""
    out = tmp_path / "run"
    args = [*RESUMABLE, f"hydra.run.dir={out}"]
    kill = fault("KillDuringWrite", epoch=1, name="last.ckpt", phase="done")
    assert run_cli([*args, *kill], tmp_path, check=False).returncode == -signal.SIGKILL
    assert epochs_logged(out)["train"] == [0]  # epoch 1 is in last.ckpt, its row is not
    run_cli(args, tmp_path)
    assert epochs_logged(out) == {"train": [0, 1, 2], "val": [0, 1, 2], "test": [3]}
    rows = [r for r in read_csv(out / "csv" / "metrics.csv") if r["train/loss"]]
    assert all(r["lr"] and r["train/acc"] and r["train/epoch_time_s"] for r in rows)
    assert same(results(out), results(reference))


def test_wandb_offline_run_resumed_keeps_one_run_id(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=2", "logger=wandb", f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1)], tmp_path, check=False)
    assert proc.returncode == 128 + signal.SIGTERM
    run_cli(args, tmp_path)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = (out / "wandb-run-id").read_text().strip()
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}
    run_cli([*args, "rerun=true"], tmp_path)  # from scratch: a new run
    assert (out / "wandb-run-id").read_text().strip() != run_id


def test_wandb_sweep_logs_its_summary_and_plot_to_one_summary_run(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        ["-m", "d=1,5", *TINY, "trainer.max_epochs=1", "logger=wandb", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    group = f"sweep-{sweep.name}"
    for job in ("d=1", "d=5"):
        (run,) = (sweep / job / "wandb").glob("offline-run-*")
        assert group.encode() in next(run.glob("*.wandb")).read_bytes()
    (run,) = (sweep / "wandb").glob("offline-run-*")
    data = next(run.glob("*.wandb")).read_bytes()
    for text in (group, "summary", "sweep/summary", "sweep/plot"):
        assert text.encode() in data, text
    (table,) = run.rglob("media/table/**/*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == read_csv_columns(sweep / "summary.csv")
    assert [row[1] for row in logged["data"]] == ["d=1", "d=5"]
    assert list(run.rglob("media/images/**/*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_parallel_launchers_skip_finished_jobs(tmp_path, launcher):
    """A finished sweep run again through joblib or submitit (the SLURM launcher's code path,
    run locally) redoes no job and writes the summary."""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    args = [
        "-m",
        f"hydra/launcher={launcher}",
        "d=1,5",
        f"hydra.sweep.dir={sweep}",
        *extra,
        *TINY,
        "trainer.max_epochs=1",
    ]
    # joblib's workers wait minutes when run.py runs forked from run_cli's server
    launch = run_in_new_process if launcher == "joblib" else run_cli
    launch(args, tmp_path)
    assert [r["status"] for r in read_csv(sweep / "summary.csv")] == ["ok", "ok"]
    before = snapshot(sweep)
    (sweep / "summary.csv").unlink()
    launch(args, tmp_path)
    assert snapshot(sweep) == before and len(before) == 2
    assert [r["job"] for r in read_csv(sweep / "summary.csv")] == ["d=1", "d=5"]


def test_a_job_whose_folder_holds_another_run_is_refused_and_listed(tmp_path):
    """A sweep job whose folder holds another run's checkpoint (here d=1's in d=5's folder) is
    refused, naming the setting and the way out, not resumed and not overwritten; the sweep
    summary lists it as refused."""
    sweep = tmp_path / "sweep"
    other = ["d=1", *TINY, "trainer.max_epochs=1", f"hydra.run.dir='{sweep / 'd=5'}'"]
    run_cli(other, tmp_path)
    last = sweep / "d=5" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    args = ["-m", "d=1,5", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: ckpt_path={last} was written with model.d=1, this run has ")
    assert error.endswith(
        "train from scratch there with rerun=true (its checkpoints are overwritten)"
    )
    assert last.read_bytes() == before
    assert [(r["d"], r["status"]) for r in read_csv(sweep / "summary.csv")] == [
        ("1", "ok"),
        ("5", "refused"),
    ]
