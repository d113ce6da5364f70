"""The offline install (docs/clusters.md, "Offline install"): dblock's wheel in a wheelhouse,
installed with ``pip install --no-index --find-links wheelhouse dblock`` into a fresh virtual
environment that already has torch and the other packages, as a GPU node without network has.

The fresh environment reuses this one's packages (no copies, no download): a ``.pth`` file makes
a folder of links to this environment's site-packages a site directory of the new one, every
entry but dblock's own (an editable install of this checkout included), so that pip sees torch
installed and dblock not.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "dblock", "datamodules")


def sh(*cmd, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` with no PYTHONPATH (nothing of this checkout importable) and no index."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def is_dblock(entry: Path) -> bool:
    """Whether a site-packages entry is (or points at) dblock: its packages, metadata, editable
    hooks, or a path file that names this checkout."""
    name = entry.name.lower()
    if "dblock" in name or name == "datamodules":
        return True
    return entry.suffix == ".pth" and str(ROOT) in entry.read_text(errors="replace")


def environment_with_torch(tmp_path: Path) -> Path:
    """A fresh virtual environment that sees this one's packages, dblock excepted; its python."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            if not is_dblock(entry) and not (shared / entry.name).exists():
                (shared / entry.name).symlink_to(entry)
    venv = tmp_path / "node"
    # without its own pip and setuptools: those of this environment (torch's setuptools) serve
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    sp = sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
    (Path(sp.stdout.strip()) / "node_packages.pth").write_text(
        f"import site; site.addsitedir({str(shared)!r})\n"
    )
    return python


@pytest.mark.slow
def test_install_from_a_wheelhouse_without_network(tmp_path):
    # on the connected machine: the project's wheel (here from a copy of the sources, so that
    # the build leaves nothing in the checkout; no build isolation: that would download)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheelhouse = tmp_path / "wheelhouse"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
       "--wheel-dir", wheelhouse, src, cwd=tmp_path)  # fmt: skip
    assert [p.name for p in wheelhouse.iterdir()] == ["dblock-0.1.0-py3-none-any.whl"]

    # on the node: torch and the rest already there, no network
    python = environment_with_torch(tmp_path)
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None, "
    probe += "u.find_spec('dblock'))"
    assert sh(python, "-c", probe, cwd=tmp_path).stdout.split() == ["True", "None"]
    proc = sh(python, "-m", "pip", "install", "--no-index", "--find-links", wheelhouse, "dblock",
              cwd=tmp_path)  # fmt: skip
    assert "Successfully installed dblock-0.1.0" in proc.stdout

    use = (
        "import torch, dblock, datamodules\n"
        "from dblock.models import SNNClassifier\n"
        "torch.manual_seed(0)\n"
        "net = SNNClassifier(4, 8, 1, 3, t_len=10)\n"
        "print(net(torch.rand(10, 2, 4)).logits.shape[1])\n"
        "print(dblock.__file__)\nprint(datamodules.__file__)\n"
    )
    n_classes, *files = sh(python, "-c", use, cwd=tmp_path).stdout.split()
    assert n_classes == "3"
    assert all(Path(f).is_relative_to(tmp_path / "node") for f in files), files
