"""Behaviour snapshot: the numbers the main job and the folder commands produce, for before/after comparisons.

Runs, on the bundled flows, the main job (``audit``, fast budget) and ``fit`` / ``score`` / ``sample`` on a few
generated images, then writes one JSON of every number in ``audit.json``, ``metrics.json``, ``scores.csv``,
``samples.csv`` and ``sample_rows.csv`` (timings, paths, dates and versions dropped). ``--compare OLD.json`` reports
every number that differs (exit 1 if any does).

    python scripts/behaviour_snapshot.py --work /tmp/snap --out snap.json [--compare before.json] [--skip-audit]

A refactoring that is meant to change nothing must leave this snapshot identical on the same machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

#: keys whose values depend on time, the machine or the output folder, not on the computation
VOLATILE = {"seconds", "started", "finished", "elapsed_s", "versions", "time", "date", "path", "out", "work",
            "duration_s", "wall_s", "command", "argv", "python", "torch", "platform", "hostname", "created",
            "report", "files", "figures", "config_path", "cwd", "elapsed"}


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "robustness_diag.cli.main", *args, "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def _images(folder: Path) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = data.astronaut()
    for i, (y, x) in enumerate([(40, 60), (200, 220), (300, 100)]):
        Image.fromarray(photo[y:y + 96, x:x + 96]).save(folder / f"crop{i}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "noise.png")


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k) not in VOLATILE:
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    elif isinstance(obj, str):
        try:
            out[prefix] = float(obj)
        except ValueError:
            out[prefix] = obj
    elif obj is None or isinstance(obj, bool):
        out[prefix] = obj


def _table(path: Path, key: str, out: dict) -> None:
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["path"]).name + (f"#{row['sample']}" if "sample" in row and key == "rows" else "")
            _flatten({k: v for k, v in row.items() if k not in VOLATILE}, f"{key}:{name}", out)


def snapshot(work: Path, skip_audit: bool, only_audit: bool = False) -> dict:
    out: dict = {}
    imgs = work / "images"
    _images(imgs)
    if not skip_audit:
        _cli("audit", "--out", str(work / "audit"), "--restart")
        for name in ("audit.json", "metrics.json"):
            _flatten(json.loads((work / "audit" / name).read_text()), name, out)
    for flow in () if only_audit else ("sr4x_affine", "sr4x_rqspline"):
        d = work / flow
        _cli("fit", f"bundled:{flow}", "--images", str(imgs), "--from-hr", "--out", str(d / "stats.safetensors"))
        _cli("score", f"bundled:{flow}", "--stats", str(d / "stats.safetensors"), "--images", str(imgs),
             "--out", str(d / "scores"), "--overwrite")
        _cli("sample", f"bundled:{flow}", "--images", str(imgs), "--from-hr", "--samples", "2",
             "--out", str(d / "samples"), "--overwrite")
        _table(d / "scores" / "scores.csv", f"{flow}/scores", out)
        _table(d / "samples" / "samples.csv", f"{flow}/samples", out)
        _table(d / "samples" / "sample_rows.csv", f"{flow}/rows", out)
    return out


def compare(old: dict, new: dict) -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        if not same:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="scratch folder for the runs")
    p.add_argument("--out", required=True, type=Path, help="snapshot JSON to write")
    p.add_argument("--compare", type=Path, help="an earlier snapshot to compare with")
    p.add_argument("--skip-audit", action="store_true", help="only fit/score/sample (seconds instead of a minute)")
    p.add_argument("--only-audit", action="store_true", help="only the main job's audit.json and metrics.json")
    a = p.parse_args(argv)
    snap = snapshot(a.work, a.skip_audit, a.only_audit)
    a.out.write_text(json.dumps(snap, indent=1, sort_keys=True))
    print(f"{len(snap)} values -> {a.out}")
    if a.compare:
        old = json.loads(a.compare.read_text())
        if a.skip_audit or a.only_audit:        # compare only the parts that ran
            old = {k: v for k, v in old.items() if k.startswith(("audit.json", "metrics.json")) == a.only_audit}
        diffs = compare(old, snap)
        print(f"{len(diffs)} differences from {a.compare}")
        for d in diffs[:200]:
            print("  " + d)
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
