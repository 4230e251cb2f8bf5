"""One home for checking where a command will write, before it does any work.

Every writing command (``fit``, ``score``, ``sample``, ``correlate``, ``report``, ``audit``, ``toy``, ``inspect
--demo``) calls :func:`check_folder` or :func:`check_file` on its output right after parsing: the folder is created if
needed and a probe file is written and removed in it, so an output under a file, in a read-only place, or a folder
where a file is expected (and the reverse) ends the command with exit code 2 and one line, before any computation.

The rule for existing results, the same in every command (and stated in each ``--help``): a command never replaces
results of an earlier run unless asked. When its output already holds them it stops with exit code 2, unless
``--overwrite`` (replace them) or, where offered, ``--resume`` (continue them: ``score``, ``sample``; ``audit``
resumes by default since its cache is keyed by every setting its results depend on, ``--overwrite`` starts over).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from robustness_diag.text import printable

#: the sentence every writing command's --help carries (see the module docstring)
OVERWRITE_RULE = ("existing results in the output are never replaced silently: the command stops (exit 2) unless "
                  "--overwrite{resume}")


def overwrite_help(resume: str = "") -> str:
    """The rule for existing results, worded for one command (``resume``: what ``--resume`` does there, if offered)."""
    return OVERWRITE_RULE.format(resume=f" or --resume ({resume})" if resume else "") + "."


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_folder(path, option: str = "--out", label: Optional[str] = None) -> Optional[str]:
    """Makes sure ``path`` is a folder this process can write to: creates it (and its parents) if needed and writes
    and removes a probe file there. Returns None when it is, else a one-line reason naming ``option`` and the path
    (``label``: what the reason starts with instead)."""
    folder = Path(path).expanduser()
    shown = label or f"{option} {printable(path)}"
    if str(path) == "":
        return f"{option}: empty path"
    if folder.exists() and not folder.is_dir():
        return f"{shown}: " + (f"{printable(folder)} is a file, not a folder" if label else "is a file, not a folder")
    if not folder.exists():
        base = _first_existing(folder)
        if base.exists() and not base.is_dir():
            return f"{shown}: cannot create the folder: {printable(base)} is a file"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"{shown}: cannot create the folder ({_reason(e)})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as e:
        return f"{shown}: cannot write in folder {printable(folder)} ({_reason(e)})"
    try:
        os.close(fd)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def check_file(path, option: str = "--out", overwrite: bool = False) -> Optional[str]:
    """Makes sure ``path`` can be written as a file: not a folder, its folder writable (created if needed), and -
    unless ``overwrite`` - not an existing file. Returns None or a one-line reason."""
    p = Path(path).expanduser()
    shown = f"{option} {printable(path)}"
    if str(path) == "" or str(path).endswith(("/", os.sep)):
        return f"{shown}: give a file name, not a folder"
    if p.is_dir():
        return f"{shown}: is a folder; give a file name"
    if p.exists() and not p.is_file():
        return f"{shown}: is not a regular file"
    err = check_folder(p.parent, option=option, label=shown)
    if err:
        return err
    if p.exists() and not overwrite:
        return f"{shown}: already exists; pass --overwrite to replace it"
    return None


def existing_results(folder, names: Iterable[str]) -> list:
    """The names among ``names`` that exist (as non-empty files) in ``folder``."""
    folder = Path(folder)
    out = []
    for n in names:
        q = folder / n
        try:
            if q.is_file() and q.stat().st_size > 0:
                out.append(n)
        except OSError:
            continue
    return out


def refuse_existing(folder, names: Iterable[str], option: str = "--out", resume: bool = False) -> Optional[str]:
    """The one-line refusal when ``folder`` already holds results (``names``), else None."""
    found = existing_results(folder, names)
    if not found:
        return None
    how = "--resume to continue them or --overwrite to replace them" if resume else "--overwrite to replace them"
    return (f"{option} {printable(folder)}: already holds results ({', '.join(printable(n) for n in found)}); "
            f"pass {how}")


__all__ = ["OVERWRITE_RULE", "overwrite_help", "check_folder", "check_file", "existing_results", "refuse_existing"]
