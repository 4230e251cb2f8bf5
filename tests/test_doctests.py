"""Runs every docstring example (``>>>``) in the package, so an example that no longer works fails the suite.

Modules are found by scanning the sources of the installed package (the library and the folders installed as
``robustness_diag.analyses`` / ``.reports`` / ``.cli``) for ``>>>``; each runs under its installed name with its own
globals, like ``doctest.testmod``. Examples that need a checkpoint or files are marked ``# doctest: +SKIP``.
"""
from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> installed package (setup.cfg ``package_dir``)
FOLDERS = {"robustness_diag": "robustness_diag", "analyses": "robustness_diag.analyses",
           "reports": "robustness_diag.reports", "cli": "robustness_diag.cli"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ">>>" in path.read_text():
                parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out.append(".".join([package] + parts))
    return out


def run_doctests(module) -> tuple[int, int, str]:
    """``(failed, attempted, report)`` for the docstring examples of ``module`` (a module object)."""
    finder, report = doctest.DocTestFinder(exclude_empty=True), io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, module.__name__):
        runner.run(test, out=report.write)
    return runner.failures, runner.tries, report.getvalue()


def test_examples_are_found():
    assert "robustness_diag.ood.scorer" in _modules_with_examples()
    assert "robustness_diag.ood.gaussian" in _modules_with_examples()


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples(name):
    failed, attempted, report = run_doctests(importlib.import_module(name))
    assert failed == 0, f"{failed} of {attempted} docstring examples failed in {name}:\n{report}"


def test_the_runner_reports_a_wrong_example(tmp_path, monkeypatch):
    src = 'def f():\n    """\n    >>> 1 + 1\n    3\n    >>> 2\n    2\n    """\n'
    (tmp_path / "doctest_selftest_mod.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    failed, attempted, report = run_doctests(importlib.import_module("doctest_selftest_mod"))
    assert (failed, attempted) == (1, 2) and "Expected:\n    3" in report
