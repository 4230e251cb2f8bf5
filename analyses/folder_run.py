r"""A generic streaming per-image loop over folders: decode, process, append a CSV row, never stop on a bad file.

Shared machinery of the commands that walk image folders (``score``, ``fit``, ``sample``). A command supplies a
per-image callback and the names of the columns it fills; this module does the rest:

* lists inputs (:func:`robustness_diag.data.images.list_images`) and decodes each file with its errors caught;
* appends one row per file to ``OUTDIR/<csv_name>`` and flushes it as soon as it is produced; the fixed columns are
  ``path`` (the item's key), ``status`` (``ok``/``error``), ``error`` (the reason), then the command's columns, then
  ``notes`` (decoder conversions and callback remarks, ``; ``-separated) and ``seconds``;
* ``resume=True`` skips every file whose key already has a row (``retry_failed=True``: only those with status
  ``ok``; the retried ones get a new row and the CSV is compacted to the last row per key at the end, atomically);
  a torn last line left by a crash is dropped first, and a table with two different successful rows for one key is
  refused (:func:`final_rows`);
* holds an exclusive lock on ``OUTDIR`` while it runs (:func:`folder_lock`): a second run into the same folder is
  refused at once with the first one's pid and host (:class:`FolderLockedError`, exit code 2);
* writes ``OUTDIR/run.json`` atomically at the start, every ``checkpoint_seconds`` and at the end: command, config,
  versions (python, platform, torch, numpy, robustness-diag, Pillow), timing, counts and the failed files with reasons,
  and ``scan`` when ``items`` is an :class:`robustness_diag.data.images.ImageList`: every entry the listing saw, used
  or skipped, counted per reason with the first names (the summary prints it as one ``inputs:`` line);
* shows a tqdm progress bar (stderr) and returns a :class:`FolderRunResult` with a printable summary.

Example (a command plugging in its own work)::

    def work(item, decoded):                       # decoded: DecodedImage
        return {"width": decoded.width, "mean": float(decoded.image.mean())}

    result = run_folder(list_images(["photos/"]), work, ["width", "mean"],
                        FolderRunConfig(out_dir="out", command="demo", config={"inputs": ["photos/"]}))
    print(result.summary()); sys.exit(result.exit_code)
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from robustness_diag.data.images import DecodedImage, ImageItem, ImageReadError, read_image
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK
from robustness_diag.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from robustness_diag.text import printable

LEADING_COLUMNS = ("path", "status", "error")
TRAILING_COLUMNS = ("notes", "seconds")


class FolderRunError(Exception):
    """A setup problem of the loop itself (output exists without --resume, CSV with other columns, ...)."""


class FolderLockedError(FolderRunError):
    """Another run holds the output folder (:func:`folder_lock`)."""


class DuplicateRowsError(FolderRunError, ValueError):
    """A result table holds two different rows that both claim one image (:func:`final_rows`)."""


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
        executor: None (the default) processes the files one after the other in this process
            (:func:`process_item`); else ``executor(items) -> iterator of (item, row)`` produces the rows of the
            files to process, in their order, each a :func:`process_item` row (an engine running the work elsewhere,
            :mod:`.engines`); the loop writes them exactly as its own.
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
    executor: Optional[Callable[[list], Any]] = None


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
    scan: Any = None                   # the listing's ScanReport (items.scan): every entry seen, used or skipped

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
        if self.scan is not None:
            lines.append(f"inputs: {printable(self.scan.describe())}")
        for f in self.failed[:max_listed]:
            lines.append(f"  FAILED {printable(f['path'])}: {printable(f['error'])}")
        if len(self.failed) > max_listed:
            lines.append(f"  ... and {len(self.failed) - max_listed} more (see the error column of the table)")
        if self.csv_path:
            lines.append(f"results: {printable(self.csv_path)}")
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
# one writer per output folder; one row per image
# ---------------------------------------------------------------------------------------------------------------------

#: the lock file inside an output folder (present only while a run holds the folder)
LOCK_NAME = ".robustness-diag.lock"
_HELD: dict = {}          # real path of a folder -> [file descriptor, depth]: the locks this process holds


def _lock_holder(fd: int) -> str:
    """What the lock file says about the run holding it (written by :func:`folder_lock`), as text."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another run (pid unknown)"
    return (f"'{info.get('command') or 'robustness-diag'}' pid {info.get('pid')} on {info.get('host', '?')}"
            + (f", started {info['started']}" if info.get("started") else ""))


def _try_lock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds the lock; None: this file system cannot lock files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: lock a byte far beyond the holder's note
        import msvcrt
        try:
            os.lseek(fd, 1 << 20, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        import errno
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return None
        return False


@contextlib.contextmanager
def folder_lock(folder, command: str = ""):
    """Holds an exclusive lock on the output folder ``folder`` (created) while the block runs.

    An OS lock (``fcntl.flock``; ``msvcrt.locking`` on Windows) on ``folder/.robustness-diag.lock``, which records the
    holder's pid, host, command and start time. The operating system releases the lock when the process ends, however
    it ends, so a killed run never leaves a stale lock; the file itself is removed when the block ends (a leftover file
    from a killed run is simply locked again). Re-entrant within one process (``sample`` holds it around its own
    preparation and the loop).

    Raises:
        FolderLockedError: another process holds the folder; the one-line message names the folder and that run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(folder)
    if real in _HELD:
        _HELD[real][1] += 1
        try:
            yield folder
        finally:
            _HELD[real][1] -= 1
        return
    path = os.path.join(real, LOCK_NAME)
    fd = None
    for _ in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _try_lock(fd)
        if locked is None:  # pragma: no cover - e.g. an old network file system
            os.close(fd)
            import warnings
            warnings.warn(f"{folder}: this file system cannot lock files; nothing stops a second run from writing "
                          f"into the folder at the same time", RuntimeWarning, stacklevel=3)
            yield folder
            return
        if not locked:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FolderLockedError(f"{folder} is in use by {holder}; wait for it to finish or use another output "
                                    f"folder")
        try:                       # the holder before us may have removed the file between our open and our lock
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            current = False
        if current:
            break
        os.close(fd)
        fd = None
    if fd is None:  # pragma: no cover - 50 lost races in a row
        raise FolderLockedError(f"{folder} is in use by other runs (its lock file {LOCK_NAME} keeps changing)")
    note = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": _now()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(note).encode("utf-8"))
    _HELD[real] = [fd, 1]
    try:
        yield folder
    finally:
        del _HELD[real]
        try:
            os.unlink(path)        # removed while still locked: the next run creates (and locks) a fresh file
        except OSError:  # pragma: no cover - Windows: an open file cannot be removed
            pass
        os.close(fd)               # releases the lock


def final_rows(rows: Sequence[Mapping], table, key_columns: Sequence[str] = ("path",)) -> dict:
    """The row that counts for each key of a result table, in first-seen order; refuses duplicated results.

    A key may have failed rows (``status`` not ``ok``) before its last row: a failed image retried with
    ``retry_failed`` and not yet compacted (a crash before the end of the run). Any other repetition means two runs
    wrote the table at once (or it was edited): when every repeated row is identical to the first in every column but
    ``seconds`` (the same result written twice) one row is kept (de-duplicated); when they differ the table is
    refused. Rows without a ``status`` column (``sample_rows.csv``) are all treated as results.

    Raises:
        DuplicateRowsError: a key with differing repeated rows (the message names the table, the key and the rows).
    """
    out: dict = {}
    where: dict = {}
    for n, r in enumerate(rows, start=1):
        k = tuple(r.get(c) for c in key_columns)
        k = k[0] if len(k) == 1 else k
        prev = out.get(k)
        if prev is not None and "status" in prev and prev.get("status") != "ok":
            out[k], where[k] = r, n                                  # a retried failure: the later row counts
        elif prev is not None:
            same = {c: v for c, v in prev.items() if c != "seconds"} == {c: v for c, v in r.items() if c != "seconds"}
            if not same:
                raise DuplicateRowsError(
                    f"{table}: {', '.join(key_columns)} {k!r} has two different result rows (rows {where[k]} and {n}); "
                    f"two runs wrote this table at once? Keep one row per image, or start a new output folder")
        else:
            out[k], where[k] = r, n
    return out


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
        FolderRunError: the table exists and neither ``resume`` nor ``overwrite`` is set, or its columns differ;
            :class:`FolderLockedError`: another run holds ``out_dir``; :class:`DuplicateRowsError`: resuming a table
            with two different rows for one image.
        KeyboardInterrupt: re-raised after run.json is written with ``status: interrupted``.
    """
    clash = [c for c in columns if c in LEADING_COLUMNS + TRAILING_COLUMNS]
    if clash:
        raise ValueError(f"columns {clash} are reserved by the loop")
    if not cfg.out_dir:
        return _run_folder(items, process, columns, cfg, extra_info)
    with folder_lock(cfg.out_dir, cfg.command):
        return _run_folder(items, process, columns, cfg, extra_info)


def _run_folder(items, process, columns, cfg: FolderRunConfig, extra_info) -> FolderRunResult:
    """:func:`run_folder` once the output folder (if any) is locked."""
    header = list(LEADING_COLUMNS) + list(columns) + list(TRAILING_COLUMNS)
    result = FolderRunResult(n_inputs=len(items), scan=getattr(items, "scan", None))
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
                done = final_rows(rows, csv_path)
                if len(done) < len(rows):          # retried failures or identical duplicates: one row per image
                    _write_rows(csv_path, header, done.values())
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
        if result.scan is not None:        # every entry the listing saw: used, or skipped with the reason
            info["scan"] = result.scan.to_dict()
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
    rows = (cfg.executor(todo) if cfg.executor is not None
            else ((it, process_item(it, process, cfg.decode)) for it in todo))
    try:
        for it, row in rows:
            if it.key in status:
                retried = True
            status[it.key] = {k: _fmt(v) for k, v in row.items()}
            result.n_processed += 1
            if writer is not None:
                writer.writerow({k: _fmt(row.get(k)) for k in header})
                fh.flush()
            if row["status"] != "ok":
                bar.write(f"FAILED {printable(it.key)}: {printable(row['error'])}", file=sys.stderr)
            bar.update(1)
            ok_n, failed_n = counts()
            bar.set_postfix(failed=len(failed_n), refresh=False)
            if time.time() - last_checkpoint > cfg.checkpoint_seconds:
                write_run_json("running")
                last_checkpoint = time.time()
    except BaseException:            # Ctrl-C, or an engine that lost its cluster: run.json says "interrupted"
        result.interrupted = True
        raise
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()                  # an executor's generator: its clean-up (workers released) runs now
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


def process_item(item: ImageItem, process: "ProcessFn", decode: Callable[[Path], Any]) -> dict:
    """The row of one file (not yet formatted): ``path``, ``status``, ``error``, the callback's values, ``notes``
    and ``seconds``. ``decode(item.path)`` then ``process(item, decoded)``; a decoding error gives its reason, any
    other exception ``"<Type>: <message>"`` (one line), and never stops the caller. Shared by the loop and the
    engines' workers (:mod:`.engines`), so a row does not depend on where it was computed."""
    t0 = time.perf_counter()
    row: dict = {"path": item.key}
    notes: list = []
    try:
        decoded = decode(item.path)
        notes += list(getattr(decoded, "notes", []) or [])
        values = dict(process(item, decoded) or {})
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
    return row


@dataclass
class PreparedRun:
    """A folder command ready to run its loop: what a command's ``prepare(config)`` builds once (flow loaded,
    statistics read, columns known) and :func:`run_folder` then uses per file. An engine (:mod:`.engines`) builds one
    per worker from the same ``prepare``, so every worker runs the command's own per-image code.

    Attributes:
        items: the files, in processing order (empty on a worker: the driver sends them one by one).
        work: ``(item, decoded) -> {column: value}`` (see :func:`run_folder`).
        columns: the command's columns. folder: the loop's :class:`FolderRunConfig`.
        extra: run.json extras (see :func:`run_folder`'s ``extra_info``).
        timing: phase name -> seconds, added up by ``work`` (an engine adds its workers' seconds).
        accumulators: streaming moments ``work`` adds to (``fit``: level -> accumulator), merged on the driver in
            input order by an engine.
        append_tables: files of ``folder.out_dir`` that ``work`` appends rows to (``sample_rows.csv``).
        state, merge_state: a record ``work`` updates across images (e.g. the worst stitching error) and how to add
            one image's record to it; an engine gives each image a fresh copy of the initial record on its worker and
            merges the results in input order with ``merge_state(state, image_record)``.
        before_loop: called with the output folder locked, before the loop (e.g. dropping orphaned rows).
        finish: what the command does with the loop's result (``fit``: the statistics), if anything.
    """

    items: Sequence[ImageItem]
    work: "ProcessFn"
    columns: Sequence[str]
    folder: FolderRunConfig
    extra: Optional[Callable[[], Mapping[str, Any]]] = None
    timing: dict = field(default_factory=dict)
    accumulators: Optional[dict] = None
    append_tables: tuple = ()
    state: Optional[dict] = None
    merge_state: Optional[Callable[[dict, dict], None]] = None
    before_loop: Optional[Callable[[], None]] = None
    finish: Optional[Callable[..., Any]] = None


def _compact(path: Path, header: list) -> None:
    """Keeps the last row per key (after retries), in first-seen order; atomic rewrite."""
    _, rows = read_table(path)
    last: dict[str, dict] = {}
    order = []
    for r in rows:
        if r["path"] not in last:
            order.append(r["path"])
        last[r["path"]] = r
    _write_rows(path, header, [last[k] for k in order])


def _write_rows(path: Path, header: list, rows) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


__all__ = ["FolderRunConfig", "FolderRunResult", "FolderRunError", "FolderLockedError", "DuplicateRowsError",
           "PreparedRun", "run_folder", "process_item", "read_table", "read_frame", "final_rows", "folder_lock",
           "LOCK_NAME", "versions", "DecodedImage", "ImageItem"]
