"""Smoke run of the speed benchmark on tiny sizes: it runs, writes its CSV, resumes, and its
summary reads it."""

from __future__ import annotations

import csv

import pytest

from experiments import bench_speed, bench_summary


def test_bench_speed_quick_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = [
        "--quick",
        "--threads",
        "1",
        "--panels",
        "shd,c",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--impls",
        "dblock,dblock_loop,dblock_chunked,standard,paper_style",
        "--data-dir",
        str(tmp_path / "data"),
        "--default-malloc",
    ]
    bench_speed.main(argv)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench_speed.COLUMNS
    impls = {(r["impl"], r["scope"], r["mode"]) for r in rows}
    for mode in ("feedforward", "recurrent"):
        for impl in ("dblock", "standard", "paper_style"):
            assert (impl, "neurons", mode) in impls and (impl, "layer", mode) in impls
        assert ("floor", "layer", mode) in impls
        for impl in ("data", "floor", "dblock", "standard"):  # the whole step, SHD panel only
            assert (impl, "step", mode) in impls
        for impl in ("data", "projection", "dblock", "standard"):  # the same, sparse batches
            assert (impl, "step_sparse", mode) in impls
    steps = [r for r in rows if r["scope"] in ("step", "step_sparse")]
    assert {r["panel"] for r in steps} == {"shd"}
    assert {r["d"] for r in steps if r["impl"] == "dblock"} == {"2", "4"}
    assert {r["d"] for r in rows if r["impl"] == "dblock"} == {"2", "4"}
    assert {r["d"] for r in rows if r["impl"] == "dblock_chunked"} == {"2", "4"}
    assert all(r["d"] == "" for r in rows if not r["impl"].startswith("dblock"))
    assert all(float(r["time_ms"]) > 0 and float(r["peak_mem_mb"]) >= 0 for r in rows)
    assert all(int(r["aten_ops"]) > 0 for r in rows if r["impl"] != "paper_style")
    assert all(r["aten_ops"] == "" for r in rows if r["impl"] == "paper_style")
    n_rows = len(rows)
    bench_summary.main([str(out)])
    summary = capsys.readouterr().out
    assert "ops dblock" in summary and "chunked/loop layer" in summary
    bench_speed.main(argv)  # resumable: nothing left to do, no duplicate rows
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == n_rows
    steps = bench_summary.step_table(bench_summary.load(str(out))).splitlines()
    assert len(steps) == 2 + 8  # header, rule, (feedforward, recurrent) x (dense, sparse) x d
    assert all(line.count("|") == steps[0].count("|") and " - |" not in line for line in steps)


def test_bench_speed_refuses_a_csv_with_other_columns(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("panel,mode,impl,scope,d,t_len,n_hidden,n_in,batch,device,time_ms,peak_mem_mb\n")
    with pytest.raises(SystemExit, match="another version"):
        bench_speed.main(["--quick", "--out", str(out)])
