"""One home for writing results: atomic file writes and the JSON encoding of every file the toolkit writes.

Every output is written to a temporary file in the target folder and moved into place with ``os.replace``, so a
reader (or a resumed run) sees either the old file or the new one, never a torn one. JSON is written by
:func:`json_text`: NumPy/torch scalars and arrays, paths, sets, tuples and dataclasses become plain JSON values,
and non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (strict JSON has no NaN;
:func:`from_json_number` reads them back).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` to produce the file at a temporary path beside ``path``, then moves it into place.

    ``write`` may use any writer that takes a path (``np.savez``, ``safetensors.save_file``, ``Image.save``; give
    it the format explicitly when it guesses from the suffix). The parent folder is created; the temporary file is
    removed if ``write`` fails. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (flushed and fsynced before the move)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj):
    """``obj`` as plain JSON values (dicts with string keys, lists, str, int, float, bool, None).

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"``; NumPy and torch scalars their Python value; arrays and
    tensors nested lists; paths strings; dataclasses dicts; anything else its ``str``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    tolist = getattr(obj, "tolist", None)          # NumPy arrays and scalars, torch tensors
    if callable(tolist):
        try:
            return to_jsonable(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def json_text(obj, indent: int = 2) -> str:
    """The JSON text of ``obj`` (via :func:`to_jsonable`), ending in a newline."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"


def atomic_write_json(path: PathLike, obj, indent: int = 2) -> Path:
    """Writes ``obj`` as JSON (:func:`json_text`) to ``path`` atomically."""
    return atomic_write_text(path, json_text(obj, indent))


def from_json_number(value) -> float:
    """Reads a number written by :func:`to_jsonable` (``"nan"``/``"inf"`` strings included) as a float."""
    return float(value)


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "to_jsonable",
           "json_text", "from_json_number"]
