"""The audit's resume cache: every finished unit of one model's audit, saved as it is produced.

One folder per model, ``out/work/<model>/``:

* ``key.json``: what the units were computed from (checkpoint spec and file digest, budget, heat, seed, device
  type, fit images); a cache whose key differs from the current run's is cleared before anything is written;
* ``static.json``: the static checks (a JSON unit);
* ``ood_stats.safetensors``: the fitted OOD statistics;
* ``cond_<name>.json`` + ``cond_<name>.npz``: one stress condition's summary row and its arrays (a JSON + arrays
  unit: the ``.npz`` is written first and the ``.json`` last, so a unit counts as finished only when both exist);
* ``adversarial.json`` + ``adversarial.npz``: the adversarial search.

Every file is written atomically (:mod:`robustness_diag.io`). The cache is *read only when resuming*: a first run (or
``resume=False``) computes each unit, writes it and goes on with the values it computed, never with what it just
wrote. JSON units are written with NaN/Infinity literals so a resumed float is bit-identical to the computed one;
arrays are stored losslessly (``np.savez_compressed``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from robustness_diag.io import atomic_write, atomic_write_text, json_text, to_jsonable

#: the file names (glob patterns) a model's cache folder may hold; only these are ever removed
_UNIT_FILES = ("key.json", "static.json", "ood_stats.safetensors", "cond_*.json", "cond_*.npz", "adversarial.json",
               "adversarial.npz", "adv_*.npz")


def _json_dump(obj) -> str:
    """Exact-round-trip JSON of a unit: NaN/Infinity as literals, other values through the toolkit's encoder."""
    return json.dumps(obj, indent=1, default=to_jsonable)


def _save_npz(path: Path, arrays: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(path, write)


class ResumeCache:
    """The cache folder of one model. ``resume``: read finished units (when the stored key equals ``key``); else
    (or when the key differs) the folder's unit files are removed and every unit is recomputed."""

    def __init__(self, folder: Path, key: dict, resume: bool):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key_text = json_text(key)
        key_path = self.folder / "key.json"
        self.reading = bool(resume) and key_path.is_file() and key_path.read_text() == key_text
        if not self.reading:
            for pattern in _UNIT_FILES:
                for f in self.folder.glob(pattern):
                    f.unlink()
            atomic_write_text(key_path, key_text)

    def _have(self, *names: str) -> bool:
        return self.reading and all((self.folder / n).is_file() for n in names)

    def json_unit(self, name: str, compute: Callable[[], dict]) -> dict:
        """``<name>.json``: read when resuming and present, else ``compute()``, saved, and returned as computed."""
        path = self.folder / f"{name}.json"
        if self._have(path.name):
            return json.loads(path.read_text())
        obj = compute()
        atomic_write_text(path, _json_dump(obj))
        return obj

    def arrays_unit(self, name: str, compute: Callable[[], tuple]) -> tuple[dict, dict]:
        """``(summary, arrays)`` of ``<name>.json`` + ``<name>.npz``: read when resuming and both are present, else
        ``compute() -> (summary dict, {key: ndarray})``, saved (arrays first), and returned as computed."""
        js, npz = self.folder / f"{name}.json", self.folder / f"{name}.npz"
        if self._have(js.name, npz.name):
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return json.loads(js.read_text()), arrays
        summary, arrays = compute()
        _save_npz(npz, arrays)
        atomic_write_text(js, _json_dump(summary))
        return summary, arrays

    def scorer_unit(self, name: str, compute: Callable, load: Callable):
        """``<name>.safetensors`` (OOD statistics): ``load(path)`` when resuming and present, else ``compute()``,
        saved with its (atomic) ``save(path)`` and returned as computed."""
        path = self.folder / f"{name}.safetensors"
        if self._have(path.name):
            return load(path)
        scorer = compute()
        scorer.save(path)                      # atomic itself
        return scorer
