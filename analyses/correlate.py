"""Does the OOD score predict where the flow breaks? Statistics and report data for one or more models.

The pipeline takes per-position observations (score, artifact events over samples, image id; see
:mod:`.stats`) for each model, computes :func:`.stats.correlate`, and writes to ``out``:

* ``metrics.json``: every statistic per model (with bootstrap intervals and "undefined" reasons);
* ``report_data.json`` (+ ``examples.npz``): everything the figures are drawn from.

The report layer (:mod:`robustness_diag.reports.correlate_report`, passed in as ``render``) draws one PNG + CSV
sidecar per figure (reliability, ROC/PR, score histograms, per-image scatter, layer traces, examples) and the
self-contained ``report.html`` from those files, so ``robustness-diag report OUT`` rebuilds them without the models.

Sources of observations: :func:`toy_results` (the 2-D toy: one "image" per condition) and
:func:`results_from_run_dirs` (the folders written by ``robustness-diag score`` and ``sample``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import stats as S


@dataclass
class ModelResult:
    """Everything the report shows about one model.

    ``obs``: per-position observations; ``explosion``: optional per-position explosion statistic ``[N]``;
    ``layer_traces``: ``{label: [{"layer", "max_log_slope"}, ...]}``; ``slope_bound``: the coupling's analytic
    log inverse-slope bound, if it has one; ``examples``: panels for :func:`reports.figures.example_panel`.
    """

    name: str
    obs: S.Observations
    explosion: Optional[np.ndarray] = None
    layer_traces: dict = field(default_factory=dict)
    slope_bound: Optional[float] = None
    examples: list = field(default_factory=list)
    image_names: Optional[list] = None
    notes: list = field(default_factory=list)


@dataclass
class CorrelateConfig:
    out: str = "runs/correlate"
    n_bins: int = 10
    n_resamples: int = 1000
    false_alarm: float = 0.05
    confidence: float = 0.95
    seed: int = 0
    title: str = "OOD score vs exploding-inverse artifacts"


# -- the 2-D toy ------------------------------------------------------------------------------------------------------
@dataclass
class ToyCorrelateConfig(CorrelateConfig):
    out: str = "runs/toy_correlate"
    steps: int = 1000
    train_seed: int = 0
    conditions: int = 120          # "images": conditions y spread over [-y_max, y_max]
    y_max: float = 30.0
    samples: int = 64              # samples per condition
    heat: float = 0.9
    slope_threshold: float = 100.0  # a sample "explodes" when some coupling's inverse slope exceeds this


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


def _ok_keys(table: Path) -> list:
    import csv
    with open(table, newline="", encoding="utf-8") as f:
        return [r["path"] for r in csv.DictReader(f) if r.get("status") == "ok"]


def _pool_events(mask: np.ndarray, grid: tuple) -> np.ndarray:
    """``[S, H, W]`` bool masks -> per-cell event counts ``[h, w]`` (a cell is an event in a sample when any of its
    HR pixels is an artifact)."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.asarray(mask, np.float32))[:, None]
    return F.adaptive_max_pool2d(m, grid)[:, 0].sum(0).numpy()


def results_from_run_dirs(dirs, grid: str = "feature") -> list[ModelResult]:
    """Joins ``score`` and ``sample`` output folders into per-model observations, paired by the checkpoint's weights
    digest (any order; one score and one sample folder per checkpoint).

    Per image present and ok in both: the score map (``maps/<name>.<level>.npy``, the first scored level) and the
    artifact masks (``maps/<name>.npz``); ``grid="feature"`` counts an event per feature-grid cell and sample when any
    HR pixel of the cell is an artifact; ``grid="hr"`` upsamples the score map to HR (bilinear) instead. The
    explosion statistic per position is its maximum over samples (non-finite = exploded, counted as +1e30).
    """
    from robustness_diag.analyses.score import _flat_name

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
        keys = [k for k in _ok_keys(sdir / "scores.csv") if k in set(_ok_keys(pdir / "samples.csv"))]
        if not keys:
            raise ValueError(f"{sdir} and {pdir} have no successfully processed image in common")
        scores, events, trials, image, explosion, names = [], [], [], [], [], []
        best = (-1.0, None)
        for i, key in enumerate(keys):
            name = _flat_name(key)
            smap_path, npz_path = sdir / "maps" / f"{name}.{level}.npy", pdir / "maps" / f"{name}.npz"
            if not smap_path.is_file():
                raise FileNotFoundError(f"{smap_path}: missing; run 'score' with --save-maps")
            if not npz_path.is_file():
                raise FileNotFoundError(f"{npz_path}: missing; run 'sample' with --save-maps")
            smap = np.load(smap_path).astype(np.float64)
            z = np.load(npz_path)
            mask, ex = z["artifact_mask"], np.nan_to_num(z["explosion"].astype(np.float64), nan=1e30, posinf=1e30)
            S_ = mask.shape[0]
            if grid == "hr":
                import torch
                import torch.nn.functional as F
                smap = F.interpolate(torch.from_numpy(smap)[None, None], size=mask.shape[1:], mode="bilinear",
                                     align_corners=False)[0, 0].numpy()
                ev, exm = mask.sum(0), ex.max(0)
            else:
                ev = _pool_events(mask, smap.shape)
                exm = _pool_events_max(ex, smap.shape)
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
        obs = S.Observations(np.concatenate(scores), np.concatenate(events), np.concatenate(trials),
                             np.concatenate(image))
        label = Path(str(g["path"]).replace("bundled:", "")).stem
        results.append(ModelResult(label, obs, np.concatenate(explosion), image_names=names,
                                   examples=[best[1]] if best[1] is not None else [],
                                   notes=[f"{label}: scores from {sdir} (level {level}), samples from {pdir}; grid "
                                          f"'{grid}'"]))
    return results


def _pool_events_max(x: np.ndarray, grid: tuple) -> np.ndarray:
    """``[S, H, W]`` -> max over samples and over each cell's HR block, ``[h, w]``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(x, np.float64)).amax(0)[None, None]
    return F.adaptive_max_pool2d(t, grid)[0, 0].numpy()


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


def run(results: list[ModelResult], cfg: CorrelateConfig, render: Optional[Callable] = None) -> dict:
    """Computes the statistics and writes ``metrics.json``, ``report_data.json`` and ``examples.npz``.

    ``render(out_dir) -> Path``: draws the figures and ``report.html`` from those files (the CLI passes
    :func:`robustness_diag.reports.correlate_report.rerender`; analyses never import the report layer).
    Returns ``{"out", "metrics", "report"}`` (``report`` None without ``render``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = analyse(results, cfg)
    data = {"title": cfg.title, "config": {k: v for k, v in vars(cfg).items()},
            "metrics": metrics,
            "histograms": {r.name: S.score_histogram_counts(r.obs.score, r.obs.events, r.obs.trials)
                           for r in results},
            "layer_traces": {f"{r.name}: {k}": v for r in results for k, v in r.layer_traces.items()},
            "slope_bounds": {f"{r.name}: {k}": r.slope_bound for r in results for k in r.layer_traces
                             if r.slope_bound is not None},
            "notes": [n for r in results for n in r.notes],
            "n_examples": sum(len(r.examples) for r in results)}
    _write_json(out / "metrics.json", {"config": data["config"], "models": metrics})
    _write_json(out / "report_data.json", data)
    examples = [dict(ex, title=f"{r.name}: {ex.get('title', '')}") for r in results for ex in r.examples]
    if examples:
        _save_examples(out / "examples.npz", examples)
    elif (out / "examples.npz").exists():
        (out / "examples.npz").unlink()               # a stale file from an earlier run must not be rendered
    report = render(out) if render is not None else None
    return {"out": str(out), "metrics": metrics, "report": None if report is None else str(report)}


# -- small I/O helpers ------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _save_examples(path: Path, examples: list) -> None:
    arrays, titles = {}, []
    for i, ex in enumerate(examples):
        titles.append(str(ex.get("title", i)))
        for k, v in ex.items():
            if k != "title" and v is not None:
                arrays[f"{i}/{k}"] = np.asarray(v)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, titles=np.array(titles), **arrays)
    tmp.replace(path)


def load_examples(path: Path) -> list:
    """The example panels saved by :func:`run` (``examples.npz``), as a list of dicts of arrays."""
    z = np.load(path, allow_pickle=False)
    out = [{"title": str(t)} for t in z["titles"]]
    for key in z.files:
        if "/" in key:
            i, k = key.split("/", 1)
            out[int(i)][k] = z[key]
    return out
