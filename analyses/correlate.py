"""Does the OOD score predict where the flow breaks? Statistics and report data for one or more models.

``run(CorrelateConfig, render=None) -> CorrelateResult``. The inputs are part of the config: the output folders of
``robustness-diag score`` and ``sample`` (``run_dirs``, paired by the checkpoint's weights digest), the 2-D toy
(:class:`ToyCorrelateConfig`), or per-position observations already in hand (``results``, e.g. from the audit).
For each model the pipeline takes per-image rows (:class:`.clustered.ImageTable`: an image's aggregate score and how
many of its samples have an artifact) and/or per-position observations (score, artifact events over samples, image id;
see :mod:`.stats`), computes the image-level statistics and held-out gate (:mod:`.clustered`) and the per-position
ones (:func:`.stats.correlate`, within condition, within image), and writes to ``out``:

* ``metrics.json``: every statistic per model (with bootstrap intervals and "undefined" reasons);
* ``report_data.json`` (+ ``examples.npz``): everything the figures are drawn from.

Score/sample folders made without ``--save-maps`` give the image level only: the scores come from ``scores.csv``
(``mean`` column), the artifacts from ``sample_rows.csv``; the model's ``obs`` is None and its metrics say why under
``per_position_unavailable`` (:func:`results_from_run_dirs`). With maps the per-position statistics are added.

The report layer (:mod:`robustness_diag.reports.correlate_report`, passed in as ``render``) draws one PNG + CSV
sidecar per figure (reliability, ROC/PR, score histograms, per-image scatter, layer traces, examples) and the
self-contained ``report.html`` from those files, so ``robustness-diag report OUT`` rebuilds them without the models.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from robustness_diag.io import atomic_write, atomic_write_json

from . import clustered as K
from . import stats as S
from .folder_run import FolderLockedError, final_rows, folder_lock, read_table
from .inputs import flat_name, name_key


@dataclass
class ModelResult:
    """Everything the report shows about one model.

    ``obs``: per-position observations, or None when there are none (run folders without maps: ``images`` holds the
    image-level data and ``positions_unavailable`` says why); ``explosion``: optional per-position explosion
    statistic ``[N]``; ``layer_traces``: ``{label: [{"layer", "max_log_slope"}, ...]}``; ``slope_bound``: the
    coupling's analytic log inverse-slope bound, if it has one; ``examples``: panels for
    :func:`reports.figures.example_panel`; ``join``: for run folders, the image counts of :func:`join_runs` plus
    ``rows_unusable``, ``map_unreadable`` and ``map_of_another_image`` (images left out at reading their table rows or
    maps) and ``maps_missing`` (images at the image level only, without maps); ``left_out``: the images left out,
    ``[{"path", "reason"}]``; ``images``: the per-image table (:class:`.clustered.ImageTable`) of the image-level
    statistics and the gate, when the image scores and per-sample flags are known; ``border``: optional
    ``{"distance": [N] int, "clean": [N] bool}`` per position (distance to the image border in positions, and whether
    the position belongs to a clean in-distribution image) for the score-versus-border profile.
    """

    name: str
    obs: Optional[S.Observations]
    explosion: Optional[np.ndarray] = None
    layer_traces: dict = field(default_factory=dict)
    slope_bound: Optional[float] = None
    examples: list = field(default_factory=list)
    image_names: Optional[list] = None
    notes: list = field(default_factory=list)
    join: Optional[dict] = None
    left_out: list = field(default_factory=list)
    images: Optional[K.ImageTable] = None
    border: Optional[dict] = None
    positions_unavailable: Optional[str] = None


@dataclass
class CorrelateConfig:
    """``robustness-diag correlate``.

    Attributes:
        out: the report folder (created).
        run_dirs: output folders of ``score`` and ``sample``, any order; with ``--save-maps`` in both the per-position
            statistics are added to the image-level ones (:func:`results_from_run_dirs`).
        grid: ``"feature"`` (an event per feature-grid cell and sample when any HR pixel of the cell is an artifact)
            or ``"hr"`` (the score map upsampled to HR pixels); see :func:`results_from_run_dirs`.
        results: observations already in hand (used instead of ``run_dirs``; not recorded in the JSON files).
        n_bins: equal-count score bins of the reliability curve. n_resamples: source-image bootstrap resamples.
        false_alarm: target false-alarm rate of the recommended threshold. confidence: of the bootstrap intervals.
        seed: bootstrap seed. title: the report's title.
    """

    out: str = "runs/correlate"
    n_bins: int = 10
    n_resamples: int = 1000
    false_alarm: float = 0.05
    confidence: float = 0.95
    seed: int = 0
    title: str = "OOD score vs exploding-inverse artifacts"
    run_dirs: Sequence[str] = ()
    grid: str = "feature"
    results: Sequence[ModelResult] = field(default=(), repr=False)


# -- the 2-D toy ------------------------------------------------------------------------------------------------------
@dataclass
class ToyCorrelateConfig(CorrelateConfig):
    """The 2-D toy (both couplings) instead of run folders: see :func:`toy_results`. ``flows``: already trained toys
    by coupling name (None: train each with ``steps`` and ``train_seed``; not recorded in the JSON files)."""

    out: str = "runs/toy_correlate"
    steps: int = 1000
    train_seed: int = 0
    conditions: int = 120          # "images": conditions y spread over [-y_max, y_max]
    y_max: float = 30.0
    samples: int = 64              # samples per condition
    heat: float = 0.9
    slope_threshold: float = 100.0  # a sample "explodes" when some coupling's inverse slope exceeds this
    flows: Optional[dict] = field(default=None, repr=False)


@dataclass
class CorrelateResult:
    """What ``correlate`` wrote: ``exit_code`` (0 done - also without maps, at the image level only -, 1 done
    without some images whose maps or table rows could not be used, each named with its reason in ``left_out``, 2
    unusable inputs with ``error``), the report folder, the statistics per model (as in ``metrics.json``), the report
    path (None without ``render``) and, for run folders, per model what the score/sample join left out
    (:func:`join_runs`, plus the row and map counts of :class:`ModelResult`)."""

    exit_code: int = EXIT_OK
    error: Optional[str] = None
    out: Optional[Path] = None
    metrics: dict = field(default_factory=dict)
    report: Optional[Path] = None
    joins: dict = field(default_factory=dict)
    left_out: dict = field(default_factory=dict)


def toy_results(cfg: ToyCorrelateConfig, couplings=("affine", "rqspline"), flows: Optional[dict] = None
                ) -> list[ModelResult]:
    """Trains the toy with each coupling and observes, per condition y, how many samples explode.

    The toy has no pixel range, so its "artifact" event is the exploding inverse itself: a sample whose largest
    inverse slope over the couplings exceeds ``slope_threshold`` (or that is not finite). The OOD score of a condition
    is the Mahalanobis distance of y from a Gaussian fitted to the training conditions (U(-1, 1)), i.e. the toy
    conditioner's feature is y itself. One condition = one "image" for the bootstrap. ``flows`` may give already
    trained toys by coupling name (else each is trained with ``cfg.steps`` and ``cfg.train_seed``).
    """
    import torch

    from robustness_diag.flows.toy import toy_data, train_toy

    g = torch.Generator().manual_seed(cfg.seed)
    _, y_train = toy_data(20000, g)
    mu, sd = float(y_train.mean()), float(y_train.std())
    ys = torch.linspace(-cfg.y_max, cfg.y_max, cfg.conditions, dtype=torch.float64).float()
    score = ((ys - mu).abs() / sd).numpy()
    out = []
    for coupling in couplings:
        flow = flows[coupling] if flows and coupling in flows else train_toy(coupling, steps=cfg.steps,
                                                                             seed=cfg.train_seed)[0]
        events = np.zeros(cfg.conditions)
        explosion = np.zeros(cfg.conditions)
        for i, yv in enumerate(ys):
            x, tr = flow.sample(torch.full((cfg.samples, 1), float(yv)), heat=cfg.heat,
                                generator=torch.Generator().manual_seed(cfg.seed + 1 + i))
            slope = tr["sample_max_log_slope"]
            bad = (slope > math.log(cfg.slope_threshold)) | ~torch.isfinite(x).all(1)
            events[i] = float(bad.sum())
            explosion[i] = float(slope.max())
        obs = S.Observations(score, events, cfg.samples, np.arange(cfg.conditions))
        bound = math.log(1 / flow.cfg.eps) if coupling == "affine" else None
        out.append(ModelResult(f"toy {coupling}", obs, explosion, slope_bound=bound,
                               image_names=[f"y={float(v):.2f}" for v in ys],
                               notes=[f"toy {coupling}: event = a sample whose inverse slope exceeds "
                                      f"{cfg.slope_threshold:g} in some coupling; {cfg.samples} samples at heat "
                                      f"{cfg.heat} per condition y in [-{cfg.y_max:g}, {cfg.y_max:g}]; training "
                                      f"conditions y ~ U(-1, 1)."]))
    return out


# -- the output folders of `score` and `sample` -------------------------------------------------------------------
def _read_run(d: Path) -> dict:
    path = d / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d}: no run.json here; pass the --out folders of 'robustness-diag score' and "
                                f"'robustness-diag sample'")
    info = json.loads(path.read_text())
    if info.get("command") not in ("score", "sample"):
        raise ValueError(f"{d}: run.json is from '{info.get('command')}', expected 'score' or 'sample'")
    if not (info.get("checkpoint") or {}).get("weights_digest"):
        raise ValueError(f"{d}: run.json does not record the checkpoint's weights digest (unfinished run?)")
    return info


def _final_table(path: Path, key_columns: Sequence[str] = ("path",)) -> dict:
    """:func:`.folder_run.final_rows` of the table at ``path`` (FileNotFoundError naming it when missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return final_rows(read_table(path)[1], path, key_columns)


def join_runs(score_dir, sample_dir) -> tuple[list, dict]:
    """The images processed successfully by both runs, and what the join left out.

    Reads ``scores.csv`` of the score run and ``samples.csv`` of the sample run (their ``status`` column) and joins
    them on the image key (``path``). Returns ``(keys, counts)``: the keys ok in both, in ``scores.csv`` order, and
    ``{"joined", "score_failed", "sample_failed", "scored_not_sampled", "sampled_not_scored"}`` image counts
    (``*_not_*``: ok in one run, absent from or failed in the other).

    One row per image: the row that counts is :func:`.folder_run.final_rows`'s (a failed row followed by its retry is
    the retry; repeated identical rows count once). A table with two *different* rows for one image (two runs wrote it
    at once) is refused: :class:`.folder_run.DuplicateRowsError` (a ``ValueError``) naming the table and the image.
    """
    scores = _final_table(Path(score_dir) / "scores.csv")
    samples = _final_table(Path(sample_dir) / "samples.csv")
    s_ok = [k for k, r in scores.items() if r.get("status") == "ok"]
    p_ok = {k for k, r in samples.items() if r.get("status") == "ok"}
    keys = [k for k in s_ok if k in p_ok]                        # in the order of scores.csv
    counts = {"joined": len(keys), "score_failed": len(scores) - len(s_ok), "sample_failed": len(samples) - len(p_ok),
              "scored_not_sampled": len(s_ok) - len(keys), "sampled_not_scored": len(p_ok) - len(keys)}
    return keys, counts


#: the column of ``scores.csv`` that is an image's score at the image level: the mean over the primary level's
#: positions (interior positions only when ``score`` left out a border margin) - the aggregate the audit's gate uses
IMAGE_SCORE_COLUMN = "mean"
#: the condition of every image of a score/sample folder: the folders record no stress condition
RUN_DIR_CONDITION = "all"


def _number(row: dict, column: str, table: str) -> float:
    value = row.get(column)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{table}: column {column!r} is {value!r}, not a number") from None


def _image_row(score_row: dict, sample_row: dict, detail: list) -> dict:
    """One image's row of the image table from its rows of ``scores.csv``, ``samples.csv`` and ``sample_rows.csv``
    (ValueError with the reason when they cannot be used)."""
    score = _number(score_row, IMAGE_SCORE_COLUMN, "scores.csv")
    if not math.isfinite(score):
        raise ValueError(f"scores.csv: its {IMAGE_SCORE_COLUMN!r} score is {score_row.get(IMAGE_SCORE_COLUMN)!r}, "
                         f"not a finite number")
    if not detail:
        raise ValueError("sample_rows.csv has no per-sample row for it (the sample run was interrupted?)")
    if sample_row.get("samples") not in (None, ""):
        expected = _number(sample_row, "samples", "samples.csv")
        if expected != len(detail):
            raise ValueError(f"sample_rows.csv has {len(detail)} per-sample rows for it but samples.csv says "
                             f"{sample_row['samples']} samples")
    flagged, fractions = 0, []
    for d in detail:
        # the paper's per-image criterion: any artifact pixel (> 1.5, < -0.5, or non-finite) in the sample
        counts = [_number(d, "artifact_pixels", "sample_rows.csv")] + [
            _number(d, c, "sample_rows.csv") for c in ("nan_pixels", "inf_pixels") if d.get(c) not in (None, "")]
        flagged += any(not (c == 0) for c in counts)              # NaN counts as flagged
        f = _number(d, "artifact_fraction", "sample_rows.csv")
        if not 0 <= f <= 1:
            raise ValueError(f"sample_rows.csv: artifact_fraction {d.get('artifact_fraction')!r} of sample "
                             f"{d.get('sample')!r} is not in [0, 1]")
        fractions.append(f)
    return {"score": score, "samples": len(detail), "flagged": flagged, "artifact_fraction": float(np.mean(fractions))}


class NoImageLevelError(ValueError):
    """The score/sample folders lack what the image level needs (:func:`read_image_rows`)."""


def read_image_rows(score_dir, sample_dir, keys: Sequence[str]) -> tuple[dict, list]:
    """What the image level needs of each joined image, from the tables of the two runs (no maps needed).

    Returns ``(rows, left_out)``: ``rows[key] = {"score", "samples", "flagged", "artifact_fraction"}`` - ``score`` is
    the :data:`IMAGE_SCORE_COLUMN` (``mean``) column of ``scores.csv`` (the primary level's; with a border margin the
    mean over the interior positions), ``samples`` the image's rows of ``sample_rows.csv``, ``flagged`` those with an
    artifact pixel (``artifact_pixels`` > 0, or NaN/Inf pixels: the per-image criterion), ``artifact_fraction`` the
    mean of their artifact fractions; ``left_out``: ``[{"path", "reason"}]`` of the keys whose rows cannot be used (a
    non-finite score, per-sample rows missing or not matching the sample count in ``samples.csv``).

    Raises:
        NoImageLevelError: ``scores.csv`` has no ``mean`` column or ``sample_rows.csv`` is missing (the folders cannot
            give the image level). FileNotFoundError: ``scores.csv`` or ``samples.csv`` is missing. ValueError: a
            table holds two different rows for one image (and sample) (:class:`.folder_run.DuplicateRowsError`).
    """
    score_dir, sample_dir = Path(score_dir), Path(sample_dir)
    scores = _final_table(score_dir / "scores.csv")
    samples = _final_table(sample_dir / "samples.csv")
    ok = [r for r in scores.values() if r.get("status") == "ok"]
    if ok and IMAGE_SCORE_COLUMN not in ok[0]:
        raise NoImageLevelError(f"{score_dir / 'scores.csv'} has no {IMAGE_SCORE_COLUMN!r} column (the image score)")
    if not (sample_dir / "sample_rows.csv").is_file():
        raise NoImageLevelError(f"{sample_dir / 'sample_rows.csv'} (the per-sample rows) is missing")
    detail: dict = {}
    for r in _final_table(sample_dir / "sample_rows.csv", ("path", "sample")).values():
        detail.setdefault(r.get("path"), []).append(r)
    rows, left_out = {}, []
    for key in keys:
        try:
            rows[key] = _image_row(scores[key], samples[key], detail.get(key, []))
        except ValueError as e:
            left_out.append({"path": key, "reason": str(e)})
    return rows, left_out


class MapError(ValueError):
    """One image's maps cannot be used: unreadable (truncated, corrupt) or recorded for another image. ``kind`` is
    ``"map_unreadable"`` or ``"map_of_another_image"`` (the count it goes to)."""

    def __init__(self, message: str, kind: str = "map_unreadable"):
        super().__init__(message)
        self.kind = kind


def read_maps(key: str, score_map, sample_map) -> tuple:
    """``(score map float64 [h, w], sample arrays {artifact_mask, explosion, attribution})`` of image ``key``: the
    ``.npy`` written by ``score`` and the ``.npz`` written by ``sample``, read completely (no pickles) and checked.

    The ``.npz`` must record ``key`` as its ``source``; the score map's identity is its file name, which must
    decode to ``key`` (:func:`.inputs.name_key`).

    Raises:
        MapError: a file that cannot be read whole (truncated, corrupt, pickled, arrays missing), a map recorded for
            another image, or one without a recorded source.
    """
    score_map, sample_map = Path(score_map), Path(sample_map)
    stem = score_map.name[:-len(".npy")].rsplit(".", 1)[0]
    if name_key(stem) != key:
        raise MapError(f"{score_map.name} is not the score map of {key!r}", "map_of_another_image")
    try:
        smap = np.load(score_map, allow_pickle=False).astype(np.float64)
        if smap.ndim != 2:
            raise ValueError(f"expected a 2-D map, found shape {smap.shape}")
    except Exception as e:  # noqa: BLE001 - any reading failure is this image's, with its reason
        raise MapError(f"{score_map}: unreadable ({type(e).__name__}: {e})") from None
    try:
        with np.load(sample_map, allow_pickle=False) as z:
            if "source" not in z.files:
                raise MapError(f"{sample_map}: records no source image (written by an older version?); refused",
                               "map_of_another_image")
            source = str(z["source"])
            if source != key:
                raise MapError(f"{sample_map}: holds the maps of {source!r}, not of {key!r}; refused",
                               "map_of_another_image")
            arrays = {k: z[k] for k in ("artifact_mask", "explosion", "attribution")}
    except MapError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt archive, missing arrays
        raise MapError(f"{sample_map}: unreadable ({type(e).__name__}: {e})") from None
    mask = arrays["artifact_mask"]
    if mask.ndim != 3 or arrays["explosion"].shape != mask.shape or arrays["attribution"].shape != mask.shape:
        raise MapError(f"{sample_map}: arrays of inconsistent shapes {mask.shape}, {arrays['explosion'].shape}, "
                       f"{arrays['attribution'].shape}")
    return smap, arrays


def _join_note(counts: dict) -> str:
    left = [f"{counts[k]} {text}" for k, text in (("score_failed", "failed in score"),
                                                    ("sample_failed", "failed in sample"),
                                                    ("scored_not_sampled", "scored but not sampled"),
                                                    ("sampled_not_scored", "sampled but not scored"),
                                                    ("rows_unusable", "with unusable table rows"),
                                                    ("map_unreadable", "with unreadable maps"),
                                                    ("map_of_another_image", "with maps of another image"))
            if counts.get(k)]
    return f"{counts['joined']} images in both runs" + (f"; left out: {', '.join(left)}" if left else "")


def _positions(key: str, smap_path: Path, npz_path: Path, grid: str) -> dict:
    """The per-position observations of one image from its maps: ``score``, ``events``, ``trials``, ``explosion``
    (flat, on ``grid``) and an ``example`` panel with its ``n_events``. MapError (or another error when the maps do
    not fit together) when they cannot be used."""
    import torch

    from robustness_diag.detect.pooling import events_per_cell, max_per_cell

    smap, z = read_maps(key, smap_path, npz_path)
    mask = z["artifact_mask"]
    ex = np.nan_to_num(z["explosion"].astype(np.float64), nan=1e30, posinf=1e30)
    n_samples = mask.shape[0]
    if grid == "hr":
        smap = torch.nn.functional.interpolate(torch.from_numpy(smap)[None, None], size=mask.shape[1:],
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
        ev, exm = mask.sum(0), ex.max(0)
    else:
        ev = events_per_cell(torch.from_numpy(mask), smap.shape)[0].numpy()
        exm = max_per_cell(torch.from_numpy(ex), smap.shape).numpy()
    n = int(mask.reshape(n_samples, -1).sum(1).argmax())
    return {"score": smap.ravel(), "events": ev.ravel(), "trials": np.full(smap.size, n_samples),
            "explosion": exm.ravel(), "n_events": float(ev.sum()),
            "example": {"title": key, "mask": mask[n], "ood": smap, "explosion": z["explosion"][n],
                        "attribution": z["attribution"][n]}}


def _missing_maps_text(sdir: Path, pdir: Path, n: int, missing: dict) -> str:
    parts = []
    for command, d in (("score", sdir), ("sample", pdir)):
        k = missing[command]
        if k == n:
            parts.append(f"the '{command}' run {d} was made without --save-maps")
        elif k:
            parts.append(f"{k} of the {n} images have no '{command}' map in {d / 'maps'}")
    return "; ".join(parts)


def results_from_run_dirs(dirs, grid: str = "feature") -> list[ModelResult]:
    """Joins ``score`` and ``sample`` output folders into per-model results, paired by the checkpoint's weights
    digest (any order; one score and one sample folder per checkpoint). Maps (``--save-maps``) are optional.

    Which images enter is :func:`join_runs` (ok in both runs); what it left out is in each model's notes and ``join``.

    *Image level* (always): every joined image is a row of the model's ``images`` (:class:`.clustered.ImageTable`,
    rows from :func:`read_image_rows`): its score is the ``mean`` column of ``scores.csv`` (primary level), its samples
    and flagged samples come from ``sample_rows.csv``. The folders record no provenance, so every image is its own
    source and every image has the condition ``"all"`` (:data:`RUN_DIR_CONDITION`): crops or degraded copies of one
    photo are counted as independent images, and there is no clean/degraded split.

    *Per position* (when maps exist): per image with both maps, the score map (``maps/<name>.<level>.npy``, the first
    scored level) and the artifact masks (``maps/<name>.npz``), ``<name>`` being :func:`.inputs.flat_name` of the key;
    ``grid="feature"`` counts an event per feature-grid cell and sample when any HR pixel of the cell is an artifact;
    ``grid="hr"`` upsamples the score map to HR (bilinear) instead. The explosion statistic per position is its maximum
    over samples (non-finite = exploded, counted as +1e30). ``obs.image`` indexes the image table's rows.

    Missing maps are not an error: when no joined image has both maps, the model has ``obs=None`` (image level only)
    and ``positions_unavailable`` says why; when some have them, the per-position statistics use those images (the
    others are counted as ``maps_missing`` in ``join`` and named in the notes) and the image level all of them.
    An image whose rows or maps exist but cannot be used (:func:`read_image_rows`; :func:`read_maps`: truncated,
    corrupt or pickled, or recorded for another image) is left out of both levels, counted in ``join``
    (``rows_unusable``, ``map_unreadable``, ``map_of_another_image``) and named with its reason in ``left_out`` and
    the notes. Folders whose tables cannot give the image level at all (:class:`NoImageLevelError`: no ``mean``
    column, no ``sample_rows.csv``) give the per-position analysis of the images with maps only (``images`` None).

    Raises:
        ValueError, FileNotFoundError: folders that cannot be paired or joined, or no image usable at either level.
    """
    groups: dict = {}
    for d in map(Path, dirs):
        info = _read_run(d)
        g = groups.setdefault(info["checkpoint"]["weights_digest"], {"path": info["checkpoint"]["path"]})
        if info["command"] in g:
            raise ValueError(f"{d} and {g[info['command']][0]} are both '{info['command']}' runs of the same "
                             f"checkpoint; pass one of each")
        g[info["command"]] = (d, info)
    results = []
    for digest, g in groups.items():
        missing = [c for c in ("score", "sample") if c not in g]
        if missing:
            raise ValueError(f"checkpoint {g['path']} (digest {digest[:12]}): no '{missing[0]}' folder among the "
                             f"RUN_DIRs")
        (sdir, sinfo), (pdir, _) = g["score"], g["sample"]
        level = sinfo["scoring"]["levels"][0]
        keys, counts = join_runs(sdir, pdir)
        if not keys:
            raise ValueError(f"{sdir} and {pdir} have no successfully processed image in common")
        try:
            rows, left_out = read_image_rows(sdir, pdir, keys)
            no_image_level = None
        except NoImageLevelError as e:          # hand-made or partial folders: per position only, if maps exist
            rows, left_out, no_image_level = None, [], str(e)
        counts.update(rows_unusable=len(left_out), map_unreadable=0, map_of_another_image=0, maps_missing=0)
        names, positions, no_maps, best = [], [], {"score": 0, "sample": 0}, (-1.0, None)
        for key in keys:
            if rows is not None and key not in rows:
                continue
            name = flat_name(key)
            smap_path, npz_path = sdir / "maps" / f"{name}.{level}.npy", pdir / "maps" / f"{name}.npz"
            has_score, has_sample = smap_path.is_file(), npz_path.is_file()
            pos = None
            if has_score and has_sample:
                try:             # damaged, pickled (object) or another image's maps: this image is left out
                    pos = _positions(key, smap_path, npz_path, grid)
                except MapError as e:
                    counts[e.kind] += 1
                    left_out.append({"path": key, "reason": str(e)})
                    continue
                except Exception as e:  # noqa: BLE001 - maps that do not fit each other (another image's size)
                    counts["map_unreadable"] += 1
                    left_out.append({"path": key, "reason": f"maps {smap_path.name} and {npz_path.name} do not fit "
                                                            f"together ({type(e).__name__}: {e})"})
                    continue
            else:
                no_maps["score"] += not has_score
                no_maps["sample"] += not has_sample
                counts["maps_missing"] += 1
                if rows is None:                    # neither level for this image
                    continue
            if pos is not None:
                example = pos.pop("example")                  # kept for the image with the most events only
                if pos["n_events"] > best[0]:
                    best = (pos["n_events"], example)
                positions.append((len(names), pos))
            names.append(key)
        counts["joined"] = len(names)
        if not names:
            why = [f"{f['path']!r}: {f['reason']}" for f in left_out[:3]]
            if no_image_level:
                why.insert(0, f"no image level ({no_image_level}) and no maps ("
                              f"{_missing_maps_text(sdir, pdir, len(keys), no_maps)})" if counts["maps_missing"] else
                              f"no image level ({no_image_level})")
            raise ValueError(f"{sdir} and {pdir}: no usable image (" + "; ".join(why) + ")")
        label = Path(str(g["path"]).replace("bundled:", "")).stem
        notes = [f"{label}: scores from {sdir} (level {level}), samples from {pdir}; {_join_note(counts)}"]
        if rows is None:
            images = None
            notes.append(f"{label}: image-level statistics not available: {no_image_level}")
        else:
            images = K.ImageTable(source=np.arange(len(names)), condition=np.full(len(names), RUN_DIR_CONDITION),
                                  score=[rows[k]["score"] for k in names], samples=[rows[k]["samples"] for k in names],
                                  flagged=[rows[k]["flagged"] for k in names],
                                  artifact_fraction=[rows[k]["artifact_fraction"] for k in names], name=list(names))
            margin = (sinfo.get("scoring") or {}).get("border_margin",
                                                      (sinfo.get("config") or {}).get("border_margin"))
            margin_text = f", leaving out a border margin of {margin} position(s)" if margin else ""
            notes.append(f"{label}: image level: an image's score is the {IMAGE_SCORE_COLUMN!r} column of scores.csv "
                         f"(mean over the positions of level {level}{margin_text}); it is flagged when any of its "
                         f"samples has an artifact pixel (sample_rows.csv). The folders record no provenance: every "
                         f"image counts as its own source and all have condition {RUN_DIR_CONDITION!r} (crops or "
                         f"degraded copies of one photo are treated as independent; no clean/degraded split).")
        unavailable = None
        if not positions:
            unavailable = (f"no maps ({_missing_maps_text(sdir, pdir, len(names), no_maps)}; run 'score' and "
                           f"'sample' with --save-maps for it)")
            notes.append(f"{label}: per-position analysis not available, image-level statistics only: {unavailable}")
            obs, explosion, examples = None, None, []
        else:
            obs = S.Observations(np.concatenate([p["score"] for _, p in positions]),
                                 np.concatenate([p["events"] for _, p in positions]),
                                 np.concatenate([p["trials"] for _, p in positions]),
                                 np.concatenate([np.full(p["score"].size, i) for i, p in positions]))
            explosion = np.concatenate([p["explosion"] for _, p in positions])
            examples = [best[1]]
            notes.append(f"{label}: per position: grid '{grid}', {len(positions)} images with maps")
            if counts["maps_missing"] and images is not None:
                notes.append(f"{label}: per-position statistics use the {len(positions)} of {len(names)} images that "
                             f"have maps ({_missing_maps_text(sdir, pdir, len(names), no_maps)}); the image level "
                             f"uses all {len(names)}")
            elif counts["maps_missing"]:
                notes.append(f"{label}: {counts['maps_missing']} images without maps left out "
                             f"({_missing_maps_text(sdir, pdir, len(keys), no_maps)})")
        notes += [f"{label}: left out {f['path']!r}: {f['reason']}" for f in left_out]
        results.append(ModelResult(label, obs, explosion, image_names=names, examples=examples, notes=notes,
                                   join=counts, left_out=left_out, images=images, positions_unavailable=unavailable))
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def analyse(results: list[ModelResult], cfg: CorrelateConfig) -> dict:
    """``{model name: statistics}``: the pooled per-position statistics (:func:`.stats.correlate`, under
    ``"pooled"`` questions), per-image rows and, from :mod:`.clustered`, the three granularities - ``image_level``
    (with ``images``), ``within_condition`` (when the conditions are known) and ``within_image`` - plus the held-out
    ``gate`` (with ``images``) and the ``border_profile`` (with ``border``)."""
    metrics = {}
    for r in results:
        if r.obs is None:
            metrics[r.name] = image_level_only(r, cfg)
            continue
        m = S.correlate(r.obs, r.explosion, cfg.n_bins, cfg.n_resamples, cfg.false_alarm, cfg.confidence, cfg.seed)
        m["pooled_question"] = POOLED_QUESTION
        if r.images is not None:
            m["per_image"] = image_rows(r.images)
        else:
            m["per_image"] = S.per_image_table(r.obs)
            if r.image_names:
                for row in m["per_image"]:
                    row["name"] = r.image_names[row["image"]]
        args = dict(n_resamples=cfg.n_resamples, confidence=cfg.confidence, seed=cfg.seed)
        if r.images is not None:
            m["image_level"] = K.image_level(r.images, **args)
            m["gate"] = K.heldout_gate(r.images, cfg.false_alarm, clean_condition=_clean_condition(r.images), **args)
        if r.obs.condition is not None:
            m["within_condition"] = K.within_condition(r.obs, **args)
        m["within_image"] = K.within_image(r.obs, **args)
        if r.border is not None:
            m["border_profile"] = border_profile(r.obs.score, r.border["distance"], r.border["clean"])
        metrics[r.name] = m
    return metrics


def image_level_only(r: ModelResult, cfg: CorrelateConfig) -> dict:
    """The statistics of a model without per-position observations (``r.obs`` None, e.g. run folders made without
    ``--save-maps``): ``n_images``, ``n_sources``, ``per_position_unavailable`` (why), ``per_image`` rows,
    ``image_level`` and the held-out ``gate``."""
    if r.images is None:
        raise ValueError(f"{r.name}: neither per-position observations nor an image table")
    args = dict(n_resamples=cfg.n_resamples, confidence=cfg.confidence, seed=cfg.seed)
    return {"n_images": int(r.images.score.size), "n_sources": int(np.unique(r.images.source).size),
            "per_position_unavailable": r.positions_unavailable or "no per-position observations",
            "per_image": image_rows(r.images), "image_level": K.image_level(r.images, **args),
            "gate": K.heldout_gate(r.images, cfg.false_alarm, clean_condition=_clean_condition(r.images), **args)}


def image_rows(t: K.ImageTable) -> list[dict]:
    """The per-image rows of an image table (the image-level statistics' data): ``image`` (index), ``name``,
    ``condition``, ``source``, ``score_mean`` (the image score the gate uses), ``flagged`` / ``samples`` and
    ``artifact_fraction``."""
    return [{"image": i, "name": None if t.name is None else t.name[i], "condition": str(t.condition[i]),
             "source": int(t.source[i]), "score_mean": float(t.score[i]), "flagged": int(t.flagged[i]),
             "samples": int(t.samples[i]), "artifact_fraction": float(t.artifact_fraction[i])}
            for i in range(t.score.size)]


def _clean_condition(t: K.ImageTable) -> Optional[str]:
    """``"clean"`` when the table tells clean from degraded images (the audit), else None (run folders)."""
    return "clean" if "clean" in set(t.condition.tolist()) else None


POOLED_QUESTION = ("Pooled over every position of every image and condition: how often does a position that breaks "
                   "score above one that does not? Mixing conditions, this mostly rewards telling conditions apart; "
                   "read the image-level and within-condition numbers for decisions.")


def border_profile(score, distance, clean, max_distance: int = 4) -> list[dict]:
    """Score against distance to the image border on clean images: per distance ``d`` (positions; the last row
    pools ``>= max_distance``) the number of positions, mean, 99th percentile and maximum score."""
    score, distance, clean = np.asarray(score), np.asarray(distance), np.asarray(clean, bool)
    rows = []
    for d in range(max_distance + 1):
        m = clean & ((distance == d) if d < max_distance else (distance >= d))
        if m.any():
            rows.append({"distance": d if d < max_distance else f">={d}", "positions": int(m.sum()),
                         "mean": float(score[m].mean()), "p99": float(np.quantile(score[m], 0.99)),
                         "max": float(score[m].max())})
    return rows


#: config fields that are inputs (objects, not settings): never written to the JSON files
_INPUT_FIELDS = ("results", "flows", "run_dirs", "grid")


def config_record(cfg: CorrelateConfig) -> dict:
    """The settings of ``cfg`` as written to ``metrics.json`` and ``report_data.json``: every field but the inputs,
    plus ``run_dirs`` and ``grid`` when the observations come from run folders."""
    rec = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _INPUT_FIELDS}
    if cfg.run_dirs and not cfg.results:
        rec.update(run_dirs=[str(d) for d in cfg.run_dirs], grid=cfg.grid)
    return rec


def gather(cfg: CorrelateConfig) -> list[ModelResult]:
    """The observations the config names: ``results`` if given, else the toy (:class:`ToyCorrelateConfig`), else
    the ``run_dirs``.

    Raises:
        ValueError, FileNotFoundError: no inputs, or run folders that cannot be joined (named with the reason).
    """
    if cfg.results:
        return list(cfg.results)
    if isinstance(cfg, ToyCorrelateConfig):
        return toy_results(cfg, flows=cfg.flows)
    if cfg.run_dirs:
        if cfg.grid not in ("feature", "hr"):
            raise ValueError(f"grid must be 'feature' or 'hr', got {cfg.grid!r}")
        return results_from_run_dirs(cfg.run_dirs, grid=cfg.grid)
    raise ValueError("nothing to correlate: give the output folders of 'score' and 'sample' (run_dirs), the toy, "
                     "or results")


def run(config: CorrelateConfig, render: Optional[Callable] = None) -> CorrelateResult:
    """Gathers the observations (:func:`gather`), computes the statistics and writes ``metrics.json``,
    ``report_data.json`` and ``examples.npz``; never raises for unusable inputs (``exit_code`` 2 and ``error``).

    ``render(out_dir) -> Path``: draws the figures and ``report.html`` from those files (the CLI passes
    :func:`robustness_diag.reports.correlate_report.rerender`; analyses never import the report layer).

    Images left out because their maps or table rows could not be used are printed to stderr with their reasons
    (``left out 'KEY' (MODEL): REASON``) and make ``exit_code`` 1; missing maps do not (image level only)."""
    try:
        results = gather(config)
    except (FileNotFoundError, ValueError) as e:
        return CorrelateResult(exit_code=EXIT_USAGE, error=str(e))
    for r in results:
        for f in r.left_out:
            print(f"left out {f['path']!r} ({r.name}): {f['reason']}", file=sys.stderr)
    return write_results(results, config, render)


def write_results(results: Sequence[ModelResult], cfg: CorrelateConfig,
                  render: Optional[Callable] = None) -> CorrelateResult:
    """The statistics of ``results`` written to ``cfg.out`` (``cfg``'s own inputs are not looked at); see
    :func:`run`. ``cfg.out`` is locked while it is written (:func:`.folder_run.folder_lock`): when another run holds
    it, nothing is written and ``exit_code`` is 2 with ``error``."""
    out = Path(cfg.out)
    try:
        with folder_lock(out, "correlate"):
            return _write_results(results, cfg, out, render)
    except FolderLockedError as e:
        return CorrelateResult(exit_code=EXIT_USAGE, error=str(e))


def _write_results(results, cfg: CorrelateConfig, out: Path, render) -> CorrelateResult:
    metrics = analyse(results, cfg)
    data = report_data(results, cfg, metrics, notes=[n for r in results for n in r.notes])
    atomic_write_json(out / "metrics.json", {"config": data["config"], "models": metrics})
    atomic_write_json(out / "report_data.json", data)
    examples = titled_examples(results)
    if examples:
        save_examples(out / "examples.npz", examples)
    elif (out / "examples.npz").exists():
        (out / "examples.npz").unlink()               # a stale file from an earlier run must not be rendered
    report = render(out) if render is not None else None
    left_out = {r.name: list(r.left_out) for r in results if r.left_out}
    return CorrelateResult(exit_code=EXIT_FAILED if left_out else EXIT_OK, out=out, metrics=metrics,
                           report=None if report is None else Path(report),
                           joins={r.name: r.join for r in results if r.join is not None}, left_out=left_out)


def report_data(results: Sequence[ModelResult], cfg: CorrelateConfig, metrics: dict, notes: Sequence[str]) -> dict:
    """What the correlation figures are drawn from (``report_data.json``): title, config record, ``metrics``
    (:func:`analyse` of ``results``), score histogram counts, layer traces with their slope bounds, ``notes``."""
    return {"title": cfg.title, "config": config_record(cfg), "metrics": metrics,
            "histograms": {r.name: S.score_histogram_counts(r.obs.score, r.obs.events, r.obs.trials)
                           for r in results if r.obs is not None},
            "layer_traces": {f"{r.name}: {k}": v for r in results for k, v in r.layer_traces.items()},
            "slope_bounds": {f"{r.name}: {k}": r.slope_bound for r in results for k in r.layer_traces
                             if r.slope_bound is not None},
            "notes": list(notes),
            "n_examples": sum(len(r.examples) for r in results)}


def titled_examples(results: Sequence[ModelResult]) -> list:
    """Every model's example panels, titled ``"<model>: <panel title>"`` (what ``examples.npz`` holds)."""
    return [dict(ex, title=f"{r.name}: {ex.get('title', '')}") for r in results for ex in r.examples]


# -- small I/O helpers ------------------------------------------------------------------------------------------------
def save_examples(path: Path, examples: list) -> Path:
    """Writes example panels (dicts of arrays with a ``title``) atomically as ``examples.npz``: ``titles`` and
    ``"<index>/<key>"`` arrays (read back by :func:`load_examples`)."""
    arrays, titles = {}, []
    for i, ex in enumerate(examples):
        titles.append(str(ex.get("title", i)))
        for k, v in ex.items():
            if k != "title" and v is not None:
                arrays[f"{i}/{k}"] = np.asarray(v)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:       # a file object: NumPy would append .npz to the temporary name
            np.savez_compressed(fh, titles=np.array(titles), **arrays)
    return atomic_write(path, write)


def load_examples(path: Path) -> list:
    """The example panels saved by :func:`run` (``examples.npz``), as a list of dicts of arrays."""
    z = np.load(path, allow_pickle=False)
    out = [{"title": str(t)} for t in z["titles"]]
    for key in z.files:
        if "/" in key:
            i, k = key.split("/", 1)
            out[int(i)][k] = z[key]
    return out


__all__ = ["ModelResult", "CorrelateConfig", "ToyCorrelateConfig", "CorrelateResult", "toy_results", "join_runs",
           "MapError", "read_maps", "NoImageLevelError", "read_image_rows", "IMAGE_SCORE_COLUMN", "RUN_DIR_CONDITION",
           "results_from_run_dirs", "image_level_only", "analyse", "config_record", "gather", "run", "write_results",
           "report_data", "titled_examples", "save_examples", "load_examples"]
