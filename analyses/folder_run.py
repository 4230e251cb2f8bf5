r"""A generic streaming per-image loop over folders: decode, process, append a CSV row, never stop on a bad file.

Shared machinery of the commands that walk image folders (``score``, ``fit``, ``sample``). A command supplies a
per-image callback and the names of the columns it fills; this module does the rest:

* lists inputs (:func:`robustness_diag.data.images.list_images`) and decodes each file with its errors caught;
* appends one row per file to ``OUTDIR/<csv_name>`` and flushes it as soon as it is produced; the fixed columns are
  ``path`` (the item's key), ``status`` (``ok``/``error``), ``error`` (the reason), then the command's columns, then
  ``notes`` (decoder conversions and callback remarks, ``; ``-separated) and ``seconds``;
* ``resume=True`` skips every file whose key already has a row (``retry_failed=True``: only those with status
  ``ok``; the retried ones get a new row and the CSV is compacted to the last row per key at the end, atomically);
  a torn last line left by a crash is dropped first;
* writes ``OUTDIR/run.json`` atomically at the start, every ``checkpoint_seconds`` and at the end: command, config,
  versions (python, platform, torch, numpy, robustness-diag, Pillow), timing, counts and the failed files with reasons;
* shows a tqdm progress bar (stderr) and returns a :class:`FolderRunResult` with a printable summary.

Example (a command plugging in its own work)::

    def work(item, decoded):                       # decoded: DecodedImage
        return {"width": decoded.width, "mean": float(decoded.image.mean())}

    result = run_folder(list_images(["photos/"]), work, ["width", "mean"],
                        FolderRunConfig(out_dir="out", command="demo", config={"inputs": ["photos/"]}))
    print(result.summary()); sys.exit(result.exit_code)
"""
from __future__ import annotations

import csv
import io
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from robustness_diag.data.images import DecodedImage, ImageItem, ImageReadError, read_image
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK
from robustness_diag.io import atomic_write_bytes, atomic_write_json, atomic_write_text

LEADING_COLUMNS = ("path", "status", "error")
TRAILING_COLUMNS = ("notes", "seconds")


class FolderRunError(Exception):
    """A setup problem of the loop itself (output exists without --resume, CSV with other columns, ...)."""


@dataclass
class FolderRunConfig:
    """Settings of the loop (the command's own settings go into ``config`` for run.json).

    Attributes:
        out_dir: where ``csv_name`` and ``run.json`` go; None = no files (the loop, errors and summary only).
        csv_name: name of the per-image table.
        resume: skip files that already have a row.
        retry_failed: with ``resume``, re-process files whose row is an error.
        overwrite: replace an existing table instead of refusing.
        progress: show a progress bar on stderr.
        command: command name recorded in run.json.
        config: the command's configuration, recorded in run.json (must be JSON-serialisable or str-able).
        decode: file -> decoded object handed to the callback (default :func:`read_image`).
        checkpoint_seconds: how often run.json is refreshed while running.
        unit: progress-bar unit.
    """

    out_dir: Optional[str] = None
    csv_name: str = "scores.csv"
    resume: bool = False
    retry_failed: bool = False
    overwrite: bool = False
    progress: bool = True
    command: str = ""
    config: dict = field(default_factory=dict)
    decode: Callable[[Path], Any] = read_image
    checkpoint_seconds: float = 30.0
    unit: str = "img"


@dataclass
class FolderRunResult:
    """What happened. Counts cover the whole table (earlier sessions included when resuming)."""

    n_inputs: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_skipped: int = 0                 # resumed: already had a row before this session
    n_processed: int = 0               # handled in this session
    failed: list = field(default_factory=list)   # [{"path": key, "error": reason}]
    seconds: float = 0.0
    out_dir: Optional[Path] = None
    csv_path: Optional[Path] = None
    run_json_path: Optional[Path] = None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every file succeeded, 1 when some failed (or the run was interrupted)."""
        return EXIT_FAILED if (self.n_failed or self.interrupted) else EXIT_OK

    def summary(self, verb: str = "processed", max_listed: int = 20) -> str:
        """Human-readable summary naming the failed files and their reasons."""
        lines = [f"{self.n_ok} of {self.n_inputs} images {verb}"
                 + (f" ({self.n_skipped} already done, skipped)" if self.n_skipped else "")
                 + (f"; {self.n_failed} failed" if self.n_failed else "")
                 + (" [interrupted]" if self.interrupted else "")
                 + (f" in {self.seconds:.1f} s" if self.seconds else "")]
        for f in self.failed[:max_listed]:
            lines.append(f"  FAILED {f['path']}: {f['error']}")
        if len(self.failed) > max_listed:
            lines.append(f"  ... and {len(self.failed) - max_listed} more (see the error column of the table)")
        if self.csv_path:
            lines.append(f"results: {self.csv_path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# small helpers (also used by commands)
# ---------------------------------------------------------------------------------------------------------------------

def versions() -> dict:
    """Versions of the interpreter and the libraries that shape the numbers."""
    import numpy
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": numpy.__version__}
    try:
        import torch
        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        out["torch"] = None
    try:
        import PIL
        out["pillow"] = PIL.__version__
    except ImportError:  # pragma: no cover
        pass
    from robustness_diag import __version__
    out["robustness_diag"] = __version__
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return "; ".join(str(x) for x in v)
    return str(v)


def read_table(path) -> tuple[list[str], list[dict]]:
    """Header and rows of a table written by :func:`run_folder` (a torn last line is ignored)."""
    text = Path(path).read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


#: columns of a result table that hold text even when every value looks like a number
TEXT_COLUMNS = ("path", "status", "error", "notes")


def read_frame(path):
    """A table written by :func:`run_folder` (or any CSV of the toolkit) as a :class:`pandas.DataFrame`.

    A torn last line is ignored. ``path``/``status``/``error``/``notes`` and every column with a non-numeric value
    stay text exactly as written (an image called ``NA.png`` stays ``"NA.png"``); the other columns become numbers
    (``nan``/``inf`` included; empty cells NaN)."""
    import pandas as pd
    text = Path(path).read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    if not text.strip():
        return pd.DataFrame()
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    for col in df.columns:
        if col in TEXT_COLUMNS:
            continue
        values = df[col].str.strip()
        numbers = pd.to_numeric(values.where(values != ""), errors="coerce")
        if not (numbers.isna() & (values != "")).any():
            df[col] = numbers
    return df


def _repair_torn_tail(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[:data.rfind(b"\n") + 1])


# ---------------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------------

ProcessFn = Callable[[ImageItem, Any], Mapping[str, Any]]


def run_folder(items: Sequence[ImageItem], process: ProcessFn, columns: Sequence[str], cfg: FolderRunConfig, *,
               extra_info: Optional[Callable[[], Mapping[str, Any]]] = None) -> FolderRunResult:
    """Runs ``process`` on every item; one row per item, appended and flushed as produced (see module docstring).

    Arguments:
        items: inputs in processing order (from :func:`list_images`).
        process: ``(item, decoded) -> {column: value}``; raise to mark the file failed (the exception message is
            the reason). Values may be numbers, strings, or lists (joined with ``; ``); a ``notes`` entry is merged
            with the decoder's notes. ``decoded`` is whatever ``cfg.decode`` returns (a :class:`DecodedImage` by
            default).
        columns: the command's column names, in order (must not repeat the fixed ones).
        cfg: :class:`FolderRunConfig`.
        extra_info: called when run.json is written; its mapping is merged into run.json (e.g. timing of phases).

    Returns:
        :class:`FolderRunResult` (``exit_code`` 0 all succeeded, 1 some failed).

    Raises:
        FolderRunError: the table exists and neither ``resume`` nor ``overwrite`` is set, or its columns differ.
        KeyboardInterrupt: re-raised after run.json is written with ``status: interrupted``.
    """
    clash = [c for c in columns if c in LEADING_COLUMNS + TRAILING_COLUMNS]
    if clash:
        raise ValueError(f"columns {clash} are reserved by the loop")
    header = list(LEADING_COLUMNS) + list(columns) + list(TRAILING_COLUMNS)
    result = FolderRunResult(n_inputs=len(items))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    done: dict[str, dict] = {}
    fh = writer = None
    started = time.time()
    started_at = _now()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.out_dir = out_dir
        result.csv_path = csv_path = out_dir / cfg.csv_name
        result.run_json_path = out_dir / "run.json"
        if csv_path.exists() and csv_path.stat().st_size > 0:
            if cfg.resume:
                _repair_torn_tail(csv_path)
                old_header, rows = read_table(csv_path)
                if old_header != header:
                    raise FolderRunError(f"{csv_path}: existing table has columns {old_header}, this run writes "
                                         f"{header}; use another output folder or --overwrite")
                for r in rows:
                    done[r["path"]] = r
            elif cfg.overwrite:
                csv_path.unlink()
            else:
                raise FolderRunError(f"{csv_path} already exists; pass --resume to continue it or --overwrite to "
                                     f"replace it")
        new_file = not csv_path.exists() or csv_path.stat().st_size == 0
        fh = open(csv_path, "a", encoding="utf-8", newline="")
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        if new_file:
            writer.writeheader()
            fh.flush()

    keys = {it.key for it in items}
    status: dict[str, dict] = {k: r for k, r in done.items() if k in keys}
    todo = []
    for it in items:
        prev = status.get(it.key)
        if prev is not None and (prev.get("status") == "ok" or not cfg.retry_failed):
            result.n_skipped += 1
        else:
            todo.append(it)

    def counts():
        ok = sum(1 for r in status.values() if r.get("status") == "ok")
        failed = [{"path": k, "error": r.get("error", "")} for k, r in status.items() if r.get("status") != "ok"]
        return ok, sorted(failed, key=lambda f: f["path"])

    def write_run_json(state: str) -> None:
        if out_dir is None:
            return
        ok, failed = counts()
        now = time.time()
        info = {
            "command": cfg.command, "status": state, "config": cfg.config, "versions": versions(),
            "timing": {"started_at": started_at, "updated_at": _now(), "seconds": round(now - started, 3),
                       "processed_this_session": result.n_processed,
                       "seconds_per_image": round((now - started) / result.n_processed, 4)
                       if result.n_processed else None},
            "counts": {"inputs": len(items), "ok": ok, "failed": len(failed), "skipped_resumed": result.n_skipped,
                       "pending": max(0, len(items) - ok - len(failed))},
            "failed": failed, "table": cfg.csv_name,
        }
        if extra_info is not None:
            try:
                info.update(dict(extra_info()))
            except Exception as e:  # never lose the run record over an extra
                info["extra_info_error"] = f"{type(e).__name__}: {e}"
        atomic_write_json(out_dir / "run.json", info)

    from tqdm.auto import tqdm
    bar = tqdm(total=len(items), initial=result.n_skipped, disable=not cfg.progress, unit=cfg.unit,
               file=sys.stderr, dynamic_ncols=True, desc=cfg.command or None)
    last_checkpoint = time.time()
    retried = False
    write_run_json("running")
    try:
        for it in todo:
            t0 = time.perf_counter()
            row: dict = {"path": it.key}
            notes: list = []
            try:
                decoded = cfg.decode(it.path)
                notes += list(getattr(decoded, "notes", []) or [])
                values = dict(process(it, decoded) or {})
                extra_notes = values.pop("notes", None)
                if extra_notes:
                    notes += [extra_notes] if isinstance(extra_notes, str) else list(extra_notes)
                row.update(values)
                row["status"] = "ok"
                row["error"] = ""
            except ImageReadError as e:
                row.update(status="error", error=e.reason)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # any failure of one file becomes its error row; the run goes on
                msg = str(e).replace("\n", " ") or type(e).__name__
                row.update(status="error", error=f"{type(e).__name__}: {msg}")
            row["notes"] = "; ".join(notes)
            row["seconds"] = round(time.perf_counter() - t0, 4)
            if it.key in status:
                retried = True
            status[it.key] = {k: _fmt(v) for k, v in row.items()}
            result.n_processed += 1
            if writer is not None:
                writer.writerow({k: _fmt(row.get(k)) for k in header})
                fh.flush()
            if row["status"] != "ok":
                bar.write(f"FAILED {it.key}: {row['error']}", file=sys.stderr)
            bar.update(1)
            ok_n, failed_n = counts()
            bar.set_postfix(failed=len(failed_n), refresh=False)
            if time.time() - last_checkpoint > cfg.checkpoint_seconds:
                write_run_json("running")
                last_checkpoint = time.time()
    except KeyboardInterrupt:
        result.interrupted = True
        raise
    finally:
        bar.close()
        if fh is not None:
            fh.close()
        if retried and out_dir is not None:
            _compact(result.csv_path, header)
        result.n_ok, result.failed = counts()
        result.n_failed = len(result.failed)
        result.seconds = time.time() - started
        write_run_json("interrupted" if result.interrupted else "finished")
    return result


def _compact(path: Path, header: list) -> None:
    """Keeps the last row per key (after retries), in first-seen order; atomic rewrite."""
    _, rows = read_table(path)
    last: dict[str, dict] = {}
    order = []
    for r in rows:
        if r["path"] not in last:
            order.append(r["path"])
        last[r["path"]] = r
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    for k in order:
        w.writerow(last[k])
    atomic_write_text(path, buf.getvalue())


__all__ = ["FolderRunConfig", "FolderRunResult", "FolderRunError", "run_folder", "read_table", "read_frame",
           "versions", "DecodedImage", "ImageItem"]
