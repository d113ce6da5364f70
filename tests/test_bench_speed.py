"""Smoke run of the speed benchmark on tiny sizes: it runs, writes its CSV, resumes, and its
summary reads it."""

from __future__ import annotations

import csv

import pytest
import torch

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
    assert all(int(r["launching_ops"]) > 0 and int(r["bytes_moved"]) > 0 for r in rows)
    n_rows = len(rows)
    bench_summary.main([str(out)])
    summary = capsys.readouterr().out
    assert "ops dblock" in summary and "chunked/loop layer" in summary
    assert "bytes dblock/floor" in summary
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


def test_dispatch_count_counts_kernels_and_their_bytes():
    """Views, allocations and metadata launch nothing; an op's bytes are its inputs' and
    outputs'; in place reads and writes; ``copy_`` and ``out=`` only write; a broadcast scalar
    is one value."""
    from experiments.dispatch_count import count_call

    x = torch.ones(8, 4)  # 128 bytes
    out = torch.empty(8, 4)

    def go():
        v = x.view(-1)[:5].unsqueeze(0).t()  # views only
        torch.empty_like(x)
        y = x * 2.0  # 1 op: 128 in, 128 out
        y.add_(x)  # in place: y read and written, x read
        torch.add(x, x, out=out)  # x twice, out written once
        out.copy_(y)  # y read, out written
        torch.ones(()).expand(8, 4) + y  # the expanded scalar moves 4 bytes
        return v

    count = count_call(go)
    assert count.ops == 6  # mul, add_, add, copy_, ones (a fill), add
    assert count.bytes == 256 + 384 + 384 + 256 + 4 + (4 + 128 + 128)
    assert count.by_op["add_"] == [1, 384]
