"""The import rules of the layout (docs/architecture in the README's Layout section): the model
core imports no framework, only ``dblock/launch`` and ``run.py`` know Hydra and OmegaConf,
Lightning lives in ``dblock/training`` and ``datamodules``, nothing imports upward, and there is
no import circle anywhere. Read from the source (every import statement, also inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dblock", "datamodules", "experiments")
HYDRA = ("hydra", "omegaconf")
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics")
CORE = ("dblock.functional", "dblock.nn", "dblock.models")
# floors, lowest first: a module may import only its own floor and the ones below
FLOORS = [
    ("dblock.errors", "dblock.values"),
    ("dblock.files", "dblock.runtime"),
    CORE,
    ("datamodules",),
    ("dblock.training", "dblock.load", "dblock.export"),
    ("dblock.launch", "dblock.predict", "dblock.sweeps"),
    ("experiments", "run"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "run.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): p for p in files if p.is_file()}


MODULES = project_modules()


def imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import statement, resolved to the deepest one known."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def floor(name: str) -> int | None:
    return next((i for i, f in enumerate(FLOORS) if within(name, f)), None)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_import_rules(name):
    found = imports(MODULES[name])
    if within(name, CORE + ("dblock.training.checkpoints", "dblock.load", "dblock.export")):
        assert not {m for m in found if top(m) in HYDRA + LIGHTNING}, "plain torch, no framework"
    if not within(name, ("dblock.launch", "run")):
        assert not {m for m in found if top(m) in HYDRA}, "only dblock/launch knows Hydra"
    if not within(name, ("dblock.training", "datamodules", "experiments", "tests")):
        assert not {m for m in found if top(m) in LIGHTNING}, "Lightning lives in training/"
    if within(name, ("dblock.errors", "dblock.values")):
        assert not {m for m in found if m in MODULES}, "the ground floor imports nothing of ours"
    own = floor(name)
    for m in found:
        if m in MODULES and own is not None and floor(m) is not None:
            assert floor(m) <= own, f"{name} imports {m} from a floor above"


def test_no_import_circle():
    graph = {n: {m for m in imports(p) if m in MODULES and m != n} for n, p in MODULES.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m) :] + [m]))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_circle_check_can_fail(monkeypatch, tmp_path):
    """A planted pair of modules that import each other is found."""
    for a, b in (("x", "y"), ("y", "x")):
        (tmp_path / f"{a}.py").write_text(f"from experiments import {b}\n")
    monkeypatch.setitem(MODULES, "experiments.x", tmp_path / "x.py")
    monkeypatch.setitem(MODULES, "experiments.y", tmp_path / "y.py")
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()


def is_script(path: Path) -> bool:
    """Whether the module at ``path`` has an ``if __name__ == "__main__":`` block."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            sides = [node.test.left, *node.test.comparators]
            names = {s.id for s in sides if isinstance(s, ast.Name)}
            values = {s.value for s in sides if isinstance(s, ast.Constant)}
            if "__name__" in names and "__main__" in values:
                return True
    return False


def test_experiments_import_no_script():
    """experiments/ is scripts on top of shared modules: no module of it imports another that
    is a script (has a ``__main__`` block), so a script never runs as another's library."""
    found = [
        f"{name} imports {m}"
        for name, path in sorted(MODULES.items())
        if within(name, ("experiments",))
        for m in sorted(imports(path))
        if within(m, ("experiments",)) and m in MODULES and m != name and is_script(MODULES[m])
    ]
    assert not found, "; ".join(found)


def test_the_script_check_can_fail(monkeypatch, tmp_path):
    """A planted module that imports a planted script is found."""
    script = 'def main():\n    pass\n\n\nif __name__ == "__main__":\n    main()\n'
    (tmp_path / "s.py").write_text(script)
    (tmp_path / "u.py").write_text("from experiments.s import main\n")
    monkeypatch.setitem(MODULES, "experiments.s", tmp_path / "s.py")
    monkeypatch.setitem(MODULES, "experiments.u", tmp_path / "u.py")
    assert is_script(tmp_path / "s.py") and not is_script(tmp_path / "u.py")
    with pytest.raises(AssertionError, match="experiments.u imports experiments.s"):
        test_experiments_import_no_script()
