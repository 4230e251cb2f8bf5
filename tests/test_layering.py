"""Dependencies point one way (ARCHITECTURE.md): cli -> reports -> analyses -> robustness_diag.

The library never imports the analyses, the report layer or the CLI; analyses never import reports or the CLI
(drawing is passed in as a callable); reports never import the CLI; nothing imports the CLI. The source folders
``analyses``, ``reports`` and ``cli`` are installed as ``robustness_diag.analyses`` / ``.reports`` / ``.cli``, so
importing them under their folder names would work in the checkout only and is refused everywhere. No module uses
another module's underscore (private) names. Checked on every import statement, including the ones inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_BANS = ("robustness_diag.analyses", "robustness_diag.reports", "robustness_diag.cli")
#: source folder -> (installed package, packages it must not import)
LAYERS = {
    "robustness_diag": ("robustness_diag", LIBRARY_BANS),
    "checkpoints": ("robustness_diag.checkpoints", LIBRARY_BANS),
    "analyses": ("robustness_diag.analyses", ("robustness_diag.reports", "robustness_diag.cli")),
    "reports": ("robustness_diag.reports", ("robustness_diag.cli",)),
    "cli": ("robustness_diag.cli", ()),
}
#: folder names that exist only in the checkout (installed under robustness_diag.*): never importable by these names
UNINSTALLED = ("analyses", "reports", "cli", "checkpoints")
PROJECT = "robustness_diag"


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of a ``from ... import`` (relative imports resolved against ``package``)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (relative imports resolved against ``package``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, package)
            out += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _is_private(name: str) -> bool:
    """``_x`` and ``__x`` are private; dunders (``__version__``, ``__all__``) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_project(mod: str) -> bool:
    return mod == PROJECT or mod.startswith(PROJECT + ".")


def _private_uses(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every use of another module's underscore name in ``path``: ``from m import _y``,
    ``import m._y``, and ``x._y`` where ``x`` is a name bound by an import of a project module (module, class or
    function). Only project modules count (third-party privates such as ``torch._C`` are not this test's business).
    """
    tree = ast.parse(path.read_text(), str(path))
    out, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not _is_project(a.name):
                    continue
                bound.add(a.asname or a.name.split(".")[0])
                if any(_is_private(p) for p in a.name.split(".")):
                    out.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, package)
            if not _is_project(mod):
                continue
            if any(_is_private(p) for p in mod.split(".")):
                out.append((node.lineno, f"from {mod} import ..."))
            for a in node.names:
                if a.name == "*":
                    continue
                bound.add(a.asname or a.name)
                if _is_private(a.name):
                    out.append((node.lineno, f"from {mod} import {a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                out.append((node.lineno, f"{ast.unparse(node)}"))
    return sorted(set(out))


def _package_of(path: Path, folder: str, top: str) -> str:
    """The package a module belongs to (for ``__init__.py``: the package itself)."""
    return ".".join([top] + list(path.relative_to(ROOT / folder).parts[:-1]))


def _modules():
    for folder, (top, _banned) in sorted(LAYERS.items()):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, path, _package_of(path, folder, top)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_upward_imports(folder):
    top, banned = LAYERS[folder]
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        pkg = _package_of(path, folder, top)
        for line, mod in _imports(path, pkg):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            elif mod.split(".")[0] in UNINSTALLED:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} (installed as {PROJECT}.{mod})")
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    bad = [f"{path.relative_to(ROOT)}:{line} {what}"
           for _folder, path, pkg in _modules() for line, what in _private_uses(path, pkg)]
    assert not bad, f"{len(bad)} uses of underscore names across modules (make them public or move them):\n" + \
        "\n".join(bad)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ..reports import figures\n    import robustness_diag.cli.main\n")
    mods = {m for _, m in _imports(f, "robustness_diag.analyses")}
    assert "robustness_diag.reports.figures" in mods and "robustness_diag.cli.main" in mods


def test_the_private_name_checker(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import torch\n"
        "from robustness_diag import __version__\n"                      # dunder: fine
        "from .score import InputOptions, _flat_name\n"                  # 3: private name, relative import
        "from robustness_diag.flows import hcflow\n"
        "import robustness_diag.flows.inspect as insp\n"
        "x = torch._C\n"                                                 # third-party: not checked
        "class A:\n"
        "    def f(self):\n"
        "        return self._own, InputOptions.public\n"               # own attribute: fine
        "def g():\n"
        "    from robustness_diag.flows.hcflow import _Split as S\n"    # 11: private name inside a function
        "    return hcflow._Squeeze, insp._UPCONV.x, robustness_diag\n"  # 12: two attribute uses
        "import robustness_diag.flows._hidden\n"                         # 13: private module
        "y = robustness_diag.flows.hcflow._Split\n")                     # 14: attribute chain from the package
    got = _private_uses(f, "robustness_diag.analyses")
    assert got == [(3, "from robustness_diag.analyses.score import _flat_name"),
                   (11, "from robustness_diag.flows.hcflow import _Split"),
                   (12, "hcflow._Squeeze"), (12, "insp._UPCONV"),
                   (13, "import robustness_diag.flows._hidden"),
                   (14, "robustness_diag.flows.hcflow._Split")], got
