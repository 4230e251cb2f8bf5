"""Per-model measurement: static checks, the OOD fit, the stress conditions and the adversarial search.

:func:`measure_model` loads one checkpoint, builds its stress suite (:mod:`.scenarios`) and runs, in this order
(each unit resumable through :mod:`.cache`):

1. **static** (:func:`measure_static`): the ``inspect`` report and, per coupling layer, the largest inverse
   log-slope its conditioner produces on the clean held-out inputs, next to the flow's hard bound
   ``flow.log_inverse_slope_bound()`` (affine: ``log 1/eps``; None when the coupling has none);
2. **OOD fit** (:func:`fit_ood`): :func:`robustness_diag.ood.fit_flow` on in-distribution LR inputs (``images``,
   else crops of the scikit-image photos the bundled flows were trained on, through ``flow.input_domain``);
3. **conditions** (:func:`measure_condition`): ``samples`` samples per image at ``heat``, traced with
   :func:`robustness_diag.detect.trace_sampling`: artifact / NaN / non-finite pixel fractions, the largest finite
   inverse log-slope, the OOD score map at the scorer's primary level and the artifact events per score cell;
4. **adversarial** (:func:`.attack.measure_adversarial`): the adversarial search on clean crops.

Units: pixel values in [0, 1]; fractions in [0, 1]; log slopes are natural logs of dimensionless inverse slopes;
OOD scores are Mahalanobis distances per feature position. Arrays kept per condition (``ConditionMeasurement.arrays``):
``score`` float64 ``[B, h, w]`` (feature grid), ``events`` float32 ``[B, h, w]`` (samples with an artifact in the
cell, 0..samples) and one example - the sample with the most artifact pixels: ``lr`` ``[h_lr, w_lr, 3]``,
``sample`` ``[H, W, 3]``, ``mask`` / ``explosion`` / ``attribution`` ``[H, W]``, ``example_image`` (its image index);
and per image ``[B]``: ``source`` (independent source id), ``flagged`` / ``samples`` / ``artifact_fraction``
(:func:`.observe.per_image_flags`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .cache import ResumeCache
from .config import AuditConfig, AuditError, slug
from .observe import example_arrays, layer_maxima, max_finite, per_image_flags, score_map
from .scenarios import Scenario, build_suite


#: bumped whenever what a cached unit holds changes (a cache of another version is started over)
MEASUREMENT_VERSION = 3


@dataclass
class ConditionMeasurement:
    """One stress condition: ``summary`` (the JSON row of ``audit.json``) and ``arrays`` (see the module
    docstring)."""

    summary: dict
    arrays: dict


@dataclass
class ModelMeasurement:
    """Everything measured on one checkpoint. ``static``: :func:`measure_static` (``inspect`` included);
    ``fit_report``: the OOD fit's report; ``conditions``: in suite order; ``adversarial``: ``{label: summary}``
    (:func:`.attack.measure_adversarial`: ``slope_8_255``, ``artifact_8_255``, their ``random_*`` baselines and the
    unconstrained searches); ``adversarial_arrays``: ``{"<panel>/<key>": array}`` examples (``budget_8_255`` and
    ``unconstrained``; keys as for conditions, ``score`` of the example image ``[h, w]``)."""

    spec: str
    name: str
    coupling: str
    family: str
    heat: float
    samples: int
    static: dict
    fit_report: dict
    conditions: list = field(default_factory=list)
    adversarial: dict = field(default_factory=dict)
    adversarial_arrays: dict = field(default_factory=dict)


# -- 1. static ------------------------------------------------------------------------------------------------------
def measure_static(flow, clean_lr: Tensor, heat: float, samples: int, seed: int) -> dict:
    """``{"inspect", "bound_log_slope", "in_distribution_max_log_slope", "in_distribution_fraction_of_bound",
    "layer_trace_clean"}`` on the clean held-out batch ``[B, 3, h, w]``."""
    from robustness_diag.detect import trace_sampling
    from robustness_diag.flows.inspect import inspect_flow

    rep = inspect_flow(flow)
    tr = trace_sampling(flow, clean_lr, heat, samples, torch.Generator().manual_seed(seed), keep_layer_maps=False,
                        return_image=False).cpu()
    per_layer = layer_maxima(tr)
    bound = flow.log_inverse_slope_bound()
    in_dist = max((r["max_log_slope"] for r in per_layer), default=float("nan"))
    return {"inspect": rep, "bound_log_slope": bound, "in_distribution_max_log_slope": in_dist,
            "in_distribution_fraction_of_bound": (in_dist / bound) if bound else None,
            "layer_trace_clean": per_layer}


# -- 2. OOD fit -----------------------------------------------------------------------------------------------------
def fit_images(flow, cfg: AuditConfig, budget: dict) -> Iterator[Tensor]:
    """In-distribution LR images ``[1, 3, h, w]`` for the fit: ``cfg.images`` (downscaled when ``cfg.from_hr``;
    unreadable files are skipped and said), else ``fit_images`` crops of the training photos of the stress suite's
    size (``lr_size`` LR px, so border positions weigh the same in the fit as in the tests)."""
    from robustness_diag.data.photos import TRAIN_PHOTOS, downscale, load_photo, random_crops

    if cfg.images:
        from robustness_diag.data.images import list_images, read_image
        items = list_images([cfg.images])
        if not items:
            raise AuditError(f"{cfg.images}: no images found for the OOD fit")
        for item in items:
            try:
                img = read_image(item.path).image
            except Exception as e:  # a bad file is skipped and said, the fit goes on
                print(f"[audit] skipping {item.path}: {e}")
                continue
            img = img[None] if img.dim() == 3 else img
            yield downscale(img, flow.scale) if cfg.from_hr else img
        return
    hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], budget["fit_images"], budget["lr_size"] * flow.scale,
                      torch.Generator().manual_seed(cfg.seed + 7), augment=False)
    for lr in flow.input_domain(downscale(hr, flow.scale)):
        yield lr[None]


def fit_ood(flow, cfg: AuditConfig, budget: dict, device: torch.device):
    """The OOD statistics (:class:`robustness_diag.ood.MahalanobisScorer`) fitted by
    :func:`robustness_diag.ood.fit_flow` on :func:`fit_images`, whose images are moved to ``device``."""
    from robustness_diag.ood import fit_flow

    return fit_flow(flow, (x.to(device) for x in fit_images(flow, cfg, budget)),
                    meta={"source": cfg.images or "scikit-image photos"})


# -- 3. stress conditions -------------------------------------------------------------------------------------------
def measure_condition(flow, scenario: Scenario, scorer, heat: float, samples: int, seed: int,
                      n_resamples: int = 1000) -> tuple[dict, dict]:
    """``(summary row, arrays)`` of one stress condition (see the module docstring). The row's ``paper_flag`` is the
    per-sample rate of the reference per-image flag (any pixel > 1.5, < -0.5 or non-finite) with its
    source-bootstrap interval over ``n_resamples`` resamples and, with no flagged sample, its exact upper bound."""
    from robustness_diag.detect import trace_sampling
    from robustness_diag.detect.pooling import events_per_cell

    from ..clustered import rate

    lr = scenario.lr
    tr = trace_sampling(flow, lr, heat, samples, torch.Generator().manual_seed(seed + 100),
                        keep_layer_maps=False).cpu()
    score = score_map(flow, scorer, lr)                                                      # [B, h, w]
    B = lr.shape[0]
    source = np.arange(B) if scenario.source is None else np.asarray(scenario.source)
    events = events_per_cell(tr.artifact_mask, tuple(score.shape[-2:]), B)
    flags = per_image_flags(tr, B)
    res = {"condition": scenario.name, "family": scenario.family, "severity": scenario.severity, "images": B,
           "samples": samples, "sources": int(np.unique(source).size),
           "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
           "paper_flag": rate(flags["flagged"], flags["samples"], source, n_resamples, seed=seed, unit="sample"),
           "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
           "frac_nan_pixels": float(tr.nan_mask.float().mean()),
           "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
           "max_log_slope": max_finite(tr.max_log_slope),
           "explosion_max": float(torch.nan_to_num(tr.explosion_map, nan=-math.inf).max()),
           "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99)),
           "layer_trace": layer_maxima(tr)}
    _, b, example = example_arrays(tr, lr)
    arrays = {"score": score.numpy(), "events": events.numpy(), **example, "example_image": np.array(b),
              "source": source, **flags}
    return res, arrays


# -- one model ------------------------------------------------------------------------------------------------------
def cache_key(spec: str, flow, cfg: AuditConfig, budget: dict, heat: float, device: torch.device) -> dict:
    """What a model's cached units depend on (a changed key starts that model's cache over)."""
    return {"checkpoint": str(spec), "sha256": flow.info.get("sha256"), "config": cfg.config, "images": cfg.images,
            "from_hr": cfg.from_hr, "budget": budget, "heat": heat, "seed": cfg.seed, "device": device.type,
            "measurements": MEASUREMENT_VERSION}


def measure_model(spec: str, cfg: AuditConfig, budget: dict, work_root: Path, device: torch.device
                  ) -> ModelMeasurement:
    """Runs (or, with ``cfg.resume``, resumes from ``work_root/<model>/``) every measurement of one checkpoint."""
    from robustness_diag.flows.loading import load_flow
    from robustness_diag.ood import MahalanobisScorer

    from ..engines import stress_units
    from .attack import measure_adversarial

    flow = load_flow(spec, config=cfg.config).eval().to(device)
    heat = float(cfg.heat if cfg.heat is not None else flow.default_heat)
    name = slug(spec)
    samples = budget["samples"]
    suite = build_suite(flow, budget, cfg.seed, device)
    cache = ResumeCache(work_root / name, cache_key(spec, flow, cfg, budget, heat, device), cfg.resume)
    clean = suite["clean"].lr

    static = cache.json_unit("static", lambda: measure_static(flow, clean, heat, samples, cfg.seed))
    scorer = cache.scorer_unit("ood_stats", lambda: fit_ood(flow, cfg, budget, device),
                               MahalanobisScorer.load).to(device)
    it = list(suite.values())
    if cfg.progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"stress {name}", unit="cond", leave=False)
    conditions = []
    units = stress_units(cfg, spec, it, cache, flow, scorer,       # here, or as parallel tasks (cfg.engine)
                         lambda flow, scorer, sc: measure_condition(flow, sc, scorer, heat, samples, cfg.seed,
                                                                    budget["bootstrap"]))
    for summary, arrays in units:
        conditions.append(ConditionMeasurement(summary, arrays))
    adv, adv_arrays = cache.arrays_unit(
        "adversarial", lambda: measure_adversarial(flow, clean[:budget["attack_images"]], scorer, heat, samples,
                                                   budget["attack_steps"], cfg.seed, cfg.progress,
                                                   suite["clean"].source, budget["bootstrap"]))
    return ModelMeasurement(str(spec), name, flow.config.coupling, flow.family, heat, samples, static,
                            scorer.fit_report, conditions, adv, adv_arrays)
