"""experiments/gpu_check.py end to end on the CPU at reduced sizes: every section runs and the
CSV and markdown table come out."""

from __future__ import annotations

import csv

import pytest
import torch

from experiments import gpu_check


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--reduced", "--out", str(tmp_path)]) == 0
    with (tmp_path / "gpu_check.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == gpu_check.COLUMNS
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert set(by) == set(gpu_check.SECTIONS)
    assert by["tests"][0]["met"] == "yes" and "passed" in by["tests"][0]["result"]
    assert [r["case"] for r in by["train"]] == ["32", "bf16-mixed"]
    assert all(r["met"] == "yes" and "test acc" in r["result"] for r in by["train"])
    for mode in gpu_check.MODES:
        cases = {(r["case"], r["d"]) for r in by["fig3"] if r["mode"] == mode}
        assert cases == {("floor", ""), ("standard", ""), ("dblock", "2"), ("dblock", "4")}
    assert all(float(r["time_ms"]) > 0 and int(r["launching_ops"]) > 0 for r in by["fig3"])
    assert all(int(r["bytes_moved"]) > 0 for r in by["fig3"] + by["shd_layer"])
    assert all(float(r["bytes_over_floor"]) > 1 for r in by["shd_layer"] if r["case"] == "dblock")
    assert all(float(r["speedup"]) > 0 for r in by["fig3"] if r["case"] == "dblock")
    assert {r["case"] for r in by["shd_layer"]} >= {"floor", "dblock"}
    assert len(by["shd_step"]) == 6 and all(float(r["over_floor"]) > 0 for r in by["shd_step"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {s}" in table for s in gpu_check.SECTIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", "unused"])
    assert exc.value.code == 2
    assert "--device cpu --reduced" in capsys.readouterr().err
