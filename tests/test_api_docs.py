"""docs/api.md's Python code blocks run, in order, as one script (a trained checkpoint from the
session's reference run stands in for the page's placeholder path)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "outputs/runs/<date>/checkpoints/best.ckpt"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_api_page_code_runs(reference, tmp_path, monkeypatch, capsys):
    page = (ROOT / "docs" / "api.md").read_text()
    blocks = python_blocks(page)
    assert len(blocks) >= 5 and PLACEHOLDER in page
    ckpt = reference / "checkpoints" / "best.ckpt"
    code = "\n".join(blocks).replace(PLACEHOLDER, str(ckpt))
    monkeypatch.chdir(tmp_path)  # the page writes predictions.csv, net.pt2, standard.nir
    namespace: dict = {"__name__": "api_page"}
    exec(compile(code, str(ROOT / "docs" / "api.md"), "exec"), namespace)
    out = capsys.readouterr().out
    # the toy model of the first section learns its task in the plain PyTorch loop
    assert namespace["accuracy"] > 0.9, out
    assert namespace["trained"].config["n_hidden"] == 16
    assert namespace["result"].accuracy is not None
    assert (tmp_path / "predictions.csv").is_file() and (tmp_path / "standard.nir").is_file()
    assert "readout.li" in out
