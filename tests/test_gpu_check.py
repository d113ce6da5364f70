"""experiments/gpu_check.py end to end on the CPU at reduced sizes: every section runs and the
CSV and markdown table come out; and what it does on a GPU node without network, which has
torch, Lightning and torchmetrics but not Hydra, OmegaConf, tonic or wandb (emulated here by an
import hook that refuses them). This file needs nothing such a node lacks to be collected."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import gpu_check

ROOT = Path(__file__).resolve().parents[1]
NODE_LACKS = ("hydra", "omegaconf", "tonic", "wandb")
# Python run with NODE_LACKS refused at import, as on such a node, then ARGV's script or pytest
WITHOUT = """
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {lacks!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Refuse())
"""


def without(code: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``python -c`` of ``WITHOUT`` + ``code`` in the repository root."""
    script = WITHOUT.format(lacks=NODE_LACKS) + code
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)},
    )


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


def test_a_node_without_the_packages_is_told_all_of_them_in_one_line(tmp_path):
    code = """
sys.argv = ["gpu_check", "--out", sys.argv[1]]
try:
    runpy.run_module("experiments.gpu_check", run_name="__main__", alter_sys=True)
finally:
    print("torch imported" if "torch" in sys.modules else "nothing imported")
"""
    proc = without(code, tmp_path, str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu_check needs "), proc.stderr
    named = re.match(r"error: gpu_check needs (.*), which ", lines[0]).group(1).split(", ")
    assert named == ["hydra-core", "omegaconf", "tonic", "wandb"]
    assert "--no-index --find-links" in lines[0]
    assert proc.stdout.strip() == "nothing imported"  # stopped before it started
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_check_and_its_tests_are_collected_without_what_a_node_lacks(tmp_path):
    files = ["tests/test_gpu_check.py", *gpu_check.kernel_test_files()]
    # hydra's pytest plugin is registered only where hydra is installed: not on such a node
    code = "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hydra_pytest", *files]
    proc = without(code, tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "collected" in summary and "error" not in summary, proc.stdout[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert collected == set(files)


def test_needs_are_the_project_dependencies_and_pytest():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in deps}
    assert set(gpu_check.NEEDS.values()) == names | {"pytest"}
    assert gpu_check.missing_packages({"torch": "torch", "no_such_module_x": "x"}) == ["x"]


def test_the_tests_section_runs_every_test_file_that_touches_the_kernels():
    files = gpu_check.kernel_test_files()
    kernels = ["test_kernels", "test_functional", "test_chunked", "test_sparse", "test_precision"]
    assert {f"tests/{name}.py" for name in kernels} <= set(files)
    for path in ROOT.glob("tests/test_*.py"):  # and no file that does not
        text = path.read_text()
        touches = re.search(r"^\s*(from|import) dblock(\.| import .*)(functional|nn)\b", text, re.M)
        assert (str(path.relative_to(ROOT)) in files) == bool(touches), path.name


def test_the_time_budget_stops_subprocesses_and_skips_sections(tmp_path):
    start = time.monotonic()
    proc = gpu_check._run([sys.executable, "-c", "import time; time.sleep(60)"], start + 1.0)
    assert proc.returncode == 124 and "time budget" in proc.stderr
    assert time.monotonic() - start < 30
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--reduced", "--budget-s", "0", "--out", str(out)]
    assert gpu_check.main(argv) == 1
    with (out / "gpu_check.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["section"] for r in rows] == list(gpu_check.SECTIONS)
    assert all(r["case"] == "skipped" and r["met"] == "no" for r in rows)
    quick, full = gpu_check.Sizes.quick(), gpu_check.Sizes()
    assert quick.budget_s <= 180 - 15 and full.budget_s <= 360 - 30  # the start comes on top
