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
4. **adversarial** (:func:`measure_adversarial`): :func:`..adversarial.attack` within the 8/255 budget and
   unconstrained, each re-sampled and scored, plus random sign noise of the same 8/255 budget.

Units: pixel values in [0, 1]; fractions in [0, 1]; log slopes are natural logs of dimensionless inverse slopes;
OOD scores are Mahalanobis distances per feature position. Arrays kept per condition (``ConditionMeasurement.arrays``):
``score`` float64 ``[B, h, w]`` (feature grid), ``events`` float32 ``[B, h, w]`` (samples with an artifact in the
cell, 0..samples) and one example - the sample with the most artifact pixels: ``lr`` ``[h_lr, w_lr, 3]``,
``sample`` ``[H, W, 3]``, ``mask`` / ``explosion`` / ``attribution`` ``[H, W]``, ``example_image`` (its image index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from .cache import ResumeCache
from .config import SMALL_BUDGET, AuditConfig, AuditError, slug
from .scenarios import Scenario, build_suite


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
    (``budget_8_255``, ``unconstrained``, ``random_8_255``); ``adversarial_arrays``: ``{"<label>/<key>": array}``
    examples of the two searches (keys as for conditions, ``score`` of the example image ``[h, w]``)."""

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


def _layer_maxima(tr) -> list:
    """``[{"layer", "max_log_slope"}]`` of every traced layer with coupling stages."""
    return [{"layer": r.name, "max_log_slope": max(float(s.log_slope_max.max()) for s in r.stages.values())}
            for r in tr.layers if r.stages]


def _max_finite(t: Tensor) -> Optional[float]:
    finite = torch.isfinite(t)
    return float(t[finite].max()) if finite.any() else None


def _score(flow, scorer, lr: Tensor) -> Tensor:
    """OOD score map at the scorer's primary level, float64 on the CPU, ``[B, h, w]``."""
    level = scorer.primary_level
    with torch.no_grad():
        return scorer({level: flow.features(lr)[level]})[level].double().cpu()


def _example(tr, lr: Tensor) -> tuple[int, int, dict]:
    """``(sample row, image index, arrays)`` of the sample with the most artifact pixels."""
    n = int(tr.artifact_pixels.argmax())
    b = int(tr.image_index[n])
    return n, b, {"lr": lr[b].permute(1, 2, 0).cpu().numpy(), "sample": tr.image[n].permute(1, 2, 0).numpy(),
                  "mask": tr.artifact_mask[n].numpy(), "explosion": tr.explosion_map[n].numpy(),
                  "attribution": tr.attribution[n].numpy()}


# -- 1. static ------------------------------------------------------------------------------------------------------
def measure_static(flow, clean_lr: Tensor, heat: float, samples: int, seed: int) -> dict:
    """``{"inspect", "bound_log_slope", "in_distribution_max_log_slope", "in_distribution_fraction_of_bound",
    "layer_trace_clean"}`` on the clean held-out batch ``[B, 3, h, w]``."""
    from robustness_diag.detect import trace_sampling
    from robustness_diag.flows.inspect import inspect_flow

    rep = inspect_flow(flow)
    tr = trace_sampling(flow, clean_lr, heat, samples, torch.Generator().manual_seed(seed), keep_layer_maps=False,
                        return_image=False).cpu()
    per_layer = _layer_maxima(tr)
    bound = flow.log_inverse_slope_bound()
    in_dist = max((r["max_log_slope"] for r in per_layer), default=float("nan"))
    return {"inspect": rep, "bound_log_slope": bound, "in_distribution_max_log_slope": in_dist,
            "in_distribution_fraction_of_bound": (in_dist / bound) if bound else None,
            "layer_trace_clean": per_layer}


# -- 2. OOD fit -----------------------------------------------------------------------------------------------------
def fit_images(flow, cfg: AuditConfig, budget: dict) -> Iterator[Tensor]:
    """In-distribution LR images ``[1, 3, h, w]`` for the fit: ``cfg.images`` (downscaled when ``cfg.from_hr``;
    unreadable files are skipped and said), else ``fit_images`` crops of the training photos."""
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
    hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], budget["fit_images"], 2 * budget["lr_size"] * flow.scale,
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
def measure_condition(flow, scenario: Scenario, scorer, heat: float, samples: int, seed: int
                      ) -> tuple[dict, dict]:
    """``(summary row, arrays)`` of one stress condition (see the module docstring)."""
    from robustness_diag.detect import trace_sampling
    from robustness_diag.detect.pooling import events_per_cell

    lr = scenario.lr
    tr = trace_sampling(flow, lr, heat, samples, torch.Generator().manual_seed(seed + 100),
                        keep_layer_maps=False).cpu()
    score = _score(flow, scorer, lr)                                                      # [B, h, w]
    B = lr.shape[0]
    events = events_per_cell(tr.artifact_mask, tuple(score.shape[-2:]), B)
    res = {"condition": scenario.name, "family": scenario.family, "severity": scenario.severity, "images": B,
           "samples": samples,
           "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
           "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
           "frac_nan_pixels": float(tr.nan_mask.float().mean()),
           "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
           "max_log_slope": _max_finite(tr.max_log_slope),
           "explosion_max": float(torch.nan_to_num(tr.explosion_map, nan=-math.inf).max()),
           "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99)),
           "layer_trace": _layer_maxima(tr)}
    _, b, example = _example(tr, lr)
    arrays = {"score": score.numpy(), "events": events.numpy(), **example, "example_image": np.array(b)}
    return res, arrays


# -- 4. adversarial -------------------------------------------------------------------------------------------------
def measure_adversarial(flow, lr: Tensor, scorer, heat: float, samples: int, steps: int, seed: int,
                        progress: bool = False) -> tuple[dict, dict]:
    """``({label: summary}, {"<label>/<key>": array})`` of the attacks on the clean batch ``lr`` within 8/255
    (``budget_8_255``) and unconstrained, and of random sign noise at +-8/255 (``random_8_255``: what a
    non-adversarial perturbation of the same budget does)."""
    from robustness_diag.detect import trace_sampling

    from ..adversarial import AttackConfig, attack

    out, arrays = {}, {}
    for label, eps in (("budget_8_255", SMALL_BUDGET), ("unconstrained", 1.0)):
        acfg = AttackConfig(epsilon=eps, steps=steps, heat=heat, seed=seed)
        res = attack(flow, lr, acfg, progress=progress)
        tr = trace_sampling(flow, res.lr, heat, samples, torch.Generator().manual_seed(seed + 200),
                            keep_layer_maps=False).cpu()
        score = _score(flow, scorer, res.lr)
        out[label] = {"epsilon": eps, "steps": acfg.steps,
                      "start_max_log_slope": float(res.start_log_slope.max()),
                      "found_max_log_slope": float(res.best_log_slope.max()),
                      "sampled_max_log_slope": _max_finite(tr.max_log_slope),
                      "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
                      "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
                      "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
                      "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99))}
        _, b, example = _example(tr, res.lr)
        arrays.update({f"{label}/{k}": v for k, v in {**example, "score": score[b].numpy()}.items()})
    g = torch.Generator().manual_seed(seed + 300)
    noisy = (lr + SMALL_BUDGET * torch.randn(lr.shape, generator=g).sign().to(lr)).clamp(0, 1)
    tr = trace_sampling(flow, noisy, heat, samples, torch.Generator().manual_seed(seed + 200), keep_layer_maps=False,
                        return_image=False).cpu()
    out["random_8_255"] = {"epsilon": SMALL_BUDGET, "sampled_max_log_slope": _max_finite(tr.max_log_slope),
                           "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
                           "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean())}
    return out, arrays


# -- one model ------------------------------------------------------------------------------------------------------
def cache_key(spec: str, flow, cfg: AuditConfig, budget: dict, heat: float, device: torch.device) -> dict:
    """What a model's cached units depend on (a changed key starts that model's cache over)."""
    return {"checkpoint": str(spec), "sha256": flow.info.get("sha256"), "config": cfg.config, "images": cfg.images,
            "from_hr": cfg.from_hr, "budget": budget, "heat": heat, "seed": cfg.seed, "device": device.type}


def measure_model(spec: str, cfg: AuditConfig, budget: dict, work_root: Path, device: torch.device
                  ) -> ModelMeasurement:
    """Runs (or, with ``cfg.resume``, resumes from ``work_root/<model>/``) every measurement of one checkpoint."""
    from robustness_diag.flows.loading import load_flow
    from robustness_diag.ood import MahalanobisScorer

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
    for sc in it:
        summary, arrays = cache.arrays_unit(
            f"cond_{sc.name}", lambda sc=sc: measure_condition(flow, sc, scorer, heat, samples, cfg.seed))
        conditions.append(ConditionMeasurement(summary, arrays))
    adv, adv_arrays = cache.arrays_unit(
        "adversarial", lambda: measure_adversarial(flow, clean[:budget["attack_images"]], scorer, heat, samples,
                                                   budget["attack_steps"], cfg.seed, cfg.progress))
    return ModelMeasurement(str(spec), name, flow.config.coupling, flow.family, heat, samples, static,
                            scorer.fit_report, conditions, adv, adv_arrays)
