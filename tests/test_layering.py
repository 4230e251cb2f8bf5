"""Dependencies point one way (ARCHITECTURE.md): cli -> reports -> analyses -> robustness_diag.

The library never imports the analyses, the report layer or the CLI; analyses never import reports or the CLI
(drawing is passed in as a callable); reports never import the CLI. Checked on every import statement, including
the ones inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> (installed package, packages it must not import)
LAYERS = {
    "robustness_diag": ("robustness_diag", ("robustness_diag.analyses", "robustness_diag.reports",
                                            "robustness_diag.cli")),
    "analyses": ("robustness_diag.analyses", ("robustness_diag.reports", "robustness_diag.cli")),
    "reports": ("robustness_diag.reports", ("robustness_diag.cli",)),
}


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (relative imports resolved against ``package``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _package_of(path: Path, folder: str, top: str) -> str:
    """The package a module belongs to (for ``__init__.py``: the package itself)."""
    return ".".join([top] + list(path.relative_to(ROOT / folder).parts[:-1]))


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_upward_imports(folder):
    top, banned = LAYERS[folder]
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        pkg = _package_of(path, folder, top)
        for line, mod in _imports(path, pkg):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ..reports import figures\n    import robustness_diag.cli.main\n")
    mods = {m for _, m in _imports(f, "robustness_diag.analyses")}
    assert "robustness_diag.reports.figures" in mods and "robustness_diag.cli.main" in mods
