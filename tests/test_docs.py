"""The docs inside the repo: every section the code cites exists, no citation leads outside the
repo, and every relative link in the Markdown pages points at a file that is there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()] or [
        p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
    ]


def texts(suffixes=(".py", ".md", ".yaml", ".toml")):
    for path in tracked():
        if path.suffix in suffixes:
            yield path, path.read_text(errors="replace")


def test_every_cited_section_exists():
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "model.md").read_text(), re.M))
    assert sections >= {"1", "2", "3", "4", "5", "6", "7"}
    cited = 0
    for path, text in texts():
        for first, last in re.findall(r"docs/model\.md §(\d+)(?:-(\d+))?", text):
            cited += 1
            assert first in sections and (not last or last in sections), f"{path}: §{first}"
        assert not re.search(r"\bSPEC §", text), f"{path} cites a document outside the repo"
    assert cited > 20


def test_relative_links_in_the_docs_resolve():
    for path, text in texts((".md",)):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links {target}"


def test_the_check_can_fail(tmp_path):
    """A page with a link to a missing file is caught by the same pattern."""
    page = "see [the model](docs/nowhere.md) and [speed](docs/speed.md#kernels)"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page)
    assert [t for t in links if not (ROOT / t).exists()] == ["docs/nowhere.md"]
