"""Does the OOD score predict where the flow breaks? Statistics and report data for one or more models.

``run(CorrelateConfig, render=None) -> CorrelateResult``. The inputs are part of the config: the output folders of
``robustness-diag score`` and ``sample`` (``run_dirs``, paired by the checkpoint's weights digest), the 2-D toy
(:class:`ToyCorrelateConfig`), or per-position observations already in hand (``results``, e.g. from the audit).
For each model the pipeline takes per-position observations (score, artifact events over samples, image id; see
:mod:`.stats`), computes :func:`.stats.correlate`, and writes to ``out``:

* ``metrics.json``: every statistic per model (with bootstrap intervals and "undefined" reasons);
* ``report_data.json`` (+ ``examples.npz``): everything the figures are drawn from.

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

from . import stats as S
from .folder_run import FolderLockedError, final_rows, folder_lock, read_table
from .inputs import flat_name, name_key


@dataclass
class ModelResult:
    """Everything the report shows about one model.

    ``obs``: per-position observations; ``explosion``: optional per-position explosion statistic ``[N]``;
    ``layer_traces``: ``{label: [{"layer", "max_log_slope"}, ...]}``; ``slope_bound``: the coupling's analytic
    log inverse-slope bound, if it has one; ``examples``: panels for :func:`reports.figures.example_panel`;
    ``join``: for run folders, the image counts of :func:`join_runs` plus ``map_unreadable`` and
    ``map_of_another_image`` (images left out at reading their maps); ``left_out``: those images,
    ``[{"path", "reason"}]``.
    """

    name: str
    obs: S.Observations
    explosion: Optional[np.ndarray] = None
    layer_traces: dict = field(default_factory=dict)
    slope_bound: Optional[float] = None
    examples: list = field(default_factory=list)
    image_names: Optional[list] = None
    notes: list = field(default_factory=list)
    join: Optional[dict] = None
    left_out: list = field(default_factory=list)


@dataclass
class CorrelateConfig:
    """``robustness-diag correlate``.

    Attributes:
        out: the report folder (created).
        run_dirs: output folders of ``score`` (with ``--save-maps``) and ``sample`` (with ``--save-maps``), any order.
        grid: ``"feature"`` (an event per feature-grid cell and sample when any HR pixel of the cell is an artifact)
            or ``"hr"`` (the score map upsampled to HR pixels); see :func:`results_from_run_dirs`.
        results: observations already in hand (used instead of ``run_dirs``; not recorded in the JSON files).
        n_bins: equal-count score bins of the reliability curve. n_resamples: image-bootstrap resamples.
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
    """What ``correlate`` wrote: ``exit_code`` (0 done, 1 done without some images whose maps could not be used,
    each named with its reason in ``left_out``, 2 unusable inputs with ``error``), the report folder, the statistics
    per model (as in ``metrics.json``), the report path (None without ``render``) and, for run folders, per model what
    the score/sample join left out (:func:`join_runs`, plus the map counts of :class:`ModelResult`)."""

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
    def final(path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        return final_rows(read_table(path)[1], path)

    scores, samples = final(Path(score_dir) / "scores.csv"), final(Path(sample_dir) / "samples.csv")
    s_ok = [k for k, r in scores.items() if r.get("status") == "ok"]
    p_ok = {k for k, r in samples.items() if r.get("status") == "ok"}
    keys = [k for k in s_ok if k in p_ok]                        # in the order of scores.csv
    counts = {"joined": len(keys), "score_failed": len(scores) - len(s_ok), "sample_failed": len(samples) - len(p_ok),
              "scored_not_sampled": len(s_ok) - len(keys), "sampled_not_scored": len(p_ok) - len(keys)}
    return keys, counts


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
                                                    ("map_unreadable", "with unreadable maps"),
                                                    ("map_of_another_image", "with maps of another image"))
            if counts.get(k)]
    return f"{counts['joined']} images in both runs" + (f"; left out: {', '.join(left)}" if left else "")


def results_from_run_dirs(dirs, grid: str = "feature") -> list[ModelResult]:
    """Joins ``score`` and ``sample`` output folders into per-model observations, paired by the checkpoint's weights
    digest (any order; one score and one sample folder per checkpoint).

    Per image present and ok in both: the score map (``maps/<name>.<level>.npy``, the first scored level) and the
    artifact masks (``maps/<name>.npz``), ``<name>`` being :func:`.inputs.flat_name` of the key; ``grid="feature"``
    counts an event per feature-grid cell and sample when any HR pixel of the cell is an artifact; ``grid="hr"``
    upsamples the score map to HR (bilinear) instead. The explosion statistic per position is its maximum over samples
    (non-finite = exploded, counted as +1e30). Which images enter is :func:`join_runs`; what it left out is in each
    model's notes and ``join``. A missing map file is an error (the run was made without ``--save-maps``); an image
    whose maps cannot be used (:func:`read_maps`: truncated, corrupt or pickled, or recorded for another image) is left
    out, counted in ``join`` and named with its reason in the model's ``left_out`` and notes.
    """
    import torch

    from robustness_diag.detect.pooling import events_per_cell, max_per_cell

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
        scores, events, trials, image, explosion, names, left_out = [], [], [], [], [], [], []
        counts.update(map_unreadable=0, map_of_another_image=0)
        best = (-1.0, None)
        for key in keys:
            name = flat_name(key)
            smap_path, npz_path = sdir / "maps" / f"{name}.{level}.npy", pdir / "maps" / f"{name}.npz"
            if not smap_path.is_file():
                raise FileNotFoundError(f"{smap_path}: missing; run 'score' with --save-maps")
            if not npz_path.is_file():
                raise FileNotFoundError(f"{npz_path}: missing; run 'sample' with --save-maps")
            try:                 # damaged, pickled (object) or another image's maps: this image is left out
                smap, z = read_maps(key, smap_path, npz_path)
                mask = z["artifact_mask"]
                ex = np.nan_to_num(z["explosion"].astype(np.float64), nan=1e30, posinf=1e30)
                S_ = mask.shape[0]
                if grid == "hr":
                    smap = torch.nn.functional.interpolate(torch.from_numpy(smap)[None, None], size=mask.shape[1:],
                                                           mode="bilinear", align_corners=False)[0, 0].numpy()
                    ev, exm = mask.sum(0), ex.max(0)
                else:
                    ev = events_per_cell(torch.from_numpy(mask), smap.shape)[0].numpy()
                    exm = max_per_cell(torch.from_numpy(ex), smap.shape).numpy()
            except MapError as e:
                counts[e.kind] += 1
                left_out.append({"path": key, "reason": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - maps that do not fit each other (another image's size)
                counts["map_unreadable"] += 1
                left_out.append({"path": key, "reason": f"maps {smap_path.name} and {npz_path.name} do not fit "
                                                        f"together ({type(e).__name__}: {e})"})
                continue
            i = len(names)
            scores.append(smap.ravel())
            events.append(ev.ravel())
            trials.append(np.full(smap.size, S_))
            image.append(np.full(smap.size, i))
            explosion.append(exm.ravel())
            names.append(key)
            if ev.sum() > best[0]:
                n = int(mask.reshape(S_, -1).sum(1).argmax())
                best = (float(ev.sum()), {"title": key, "mask": mask[n], "ood": smap, "explosion": z["explosion"][n],
                                          "attribution": z["attribution"][n]})
        counts["joined"] = len(names)
        if not names:
            raise ValueError(f"{sdir} and {pdir}: no image with usable maps ("
                             + "; ".join(f"{f['path']!r}: {f['reason']}" for f in left_out[:3]) + ")")
        obs = S.Observations(np.concatenate(scores), np.concatenate(events), np.concatenate(trials),
                             np.concatenate(image))
        label = Path(str(g["path"]).replace("bundled:", "")).stem
        notes = [f"{label}: scores from {sdir} (level {level}), samples from {pdir}; grid '{grid}'; "
                 f"{_join_note(counts)}"]
        notes += [f"{label}: left out {f['path']!r}: {f['reason']}" for f in left_out]
        results.append(ModelResult(label, obs, np.concatenate(explosion), image_names=names,
                                   examples=[best[1]] if best[1] is not None else [], notes=notes, join=counts,
                                   left_out=left_out))
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def analyse(results: list[ModelResult], cfg: CorrelateConfig) -> dict:
    """``{model name: stats.correlate(...) + per_image rows + score histogram counts}``."""
    metrics = {}
    for r in results:
        m = S.correlate(r.obs, r.explosion, cfg.n_bins, cfg.n_resamples, cfg.false_alarm, cfg.confidence, cfg.seed)
        table = S.per_image_table(r.obs)
        if r.image_names:
            for row in table:
                row["name"] = r.image_names[row["image"]]
        m["per_image"] = table
        metrics[r.name] = m
    return metrics


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

    Images left out because their maps could not be used are printed to stderr with their reasons (``left out
    'KEY' (MODEL): REASON``) and make ``exit_code`` 1."""
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
                           for r in results},
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
           "MapError", "read_maps",
           "results_from_run_dirs", "analyse", "config_record", "gather", "run", "write_results", "report_data",
           "titled_examples", "save_examples", "load_examples"]
