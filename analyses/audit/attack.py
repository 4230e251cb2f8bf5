"""The adversarial unit of the audit: attacks on clean held-out LR crops with both objectives, the best-of-N random
baseline, every found input re-sampled with fresh latents and judged by the paper's per-image flag.

See :func:`measure_adversarial`. Units: pixel values in [0, 1]; fractions of pixels in [0, 1]; rates are of samples;
log slopes are natural logs of dimensionless inverse slopes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .config import SMALL_BUDGET
from .observe import example_arrays, max_finite, per_image_flags, score_map

#: the searches run: ``(budget label, epsilon)``; the 8/255 budget is judged, the unconstrained one is a caveat
BUDGETS = (("8_255", SMALL_BUDGET), ("unconstrained", 1.0))
#: seed offset of the fresh latents every found input is re-sampled with (the searches use ``seed`` itself)
FRESH_LATENTS = 200
#: the example panels kept: ``{array prefix: budget label}`` (the worst attack of that budget, see
#: :func:`worst_attack`)
EXAMPLE_PANELS = {"budget_8_255": "8_255", "unconstrained": "unconstrained"}


def worst_attack(summaries: dict, labels: list) -> str:
    """The label (of ``labels``) with the most broken samples: highest per-sample flag rate, then most non-finite,
    then most out-of-range pixels."""
    def key(lab):
        s = summaries[lab]
        return (s["paper_flag"].get("value") or 0.0, s["frac_nonfinite_pixels"], s["frac_artifact_pixels"])
    return max(labels, key=key)


def _resampled(flow, lr: Tensor, scorer, heat: float, samples: int, seed: int, source: np.ndarray,
               n_resamples: int, keep_image: bool):
    """``(summary fields, trace, score map)`` of ``lr`` re-sampled ``samples`` times per image with fresh latents."""
    from robustness_diag.detect import trace_sampling

    from ..clustered import rate

    tr = trace_sampling(flow, lr, heat, samples, torch.Generator().manual_seed(seed + FRESH_LATENTS),
                        keep_layer_maps=False, return_image=keep_image).cpu()
    score = score_map(flow, scorer, lr)
    flags = per_image_flags(tr, lr.shape[0])
    fields = {"images": int(lr.shape[0]), "samples": samples, "sources": int(np.unique(source).size),
              "fresh_latent_seed": seed + FRESH_LATENTS, "attack_latent_seed": seed,
              "paper_flag": rate(flags["flagged"], flags["samples"], source, n_resamples, seed=seed, unit="sample"),
              "frac_samples_with_artifact": float((tr.artifact_pixels > 0).float().mean()),
              "frac_artifact_pixels": float(tr.artifact_mask.float().mean()),
              "frac_nonfinite_pixels": float((tr.nan_mask | tr.inf_mask).float().mean()),
              "sampled_max_log_slope": max_finite(tr.max_log_slope),
              "score_mean": float(score.mean()), "score_p99": float(torch.quantile(score.flatten(), 0.99))}
    return fields, tr, score


def measure_adversarial(flow, lr: Tensor, scorer, heat: float, samples: int, steps: int, seed: int,
                        progress: bool = False, source: Optional[np.ndarray] = None,
                        n_resamples: int = 1000) -> tuple[dict, dict]:
    """``({label: summary}, {"<panel>/<key>": array})`` of the adversarial searches on the clean batch ``lr``.

    Runs, on the search's fixed latents (``seed``): :func:`..adversarial.attack` with each objective of
    :data:`..adversarial.OBJECTIVES` within 8/255 (labels ``slope_8_255``, ``artifact_8_255``) and unconstrained
    (``slope_unconstrained``, ``artifact_unconstrained``), and the random baseline per objective
    (``random_slope_8_255``, ``random_artifact_8_255``: :func:`..adversarial.random_search`, the best of as many
    random sign perturbations of the 8/255 budget as the attack evaluated iterates, by the same objective). Every
    found input is then re-sampled ``samples`` times per image with fresh latents (seed ``seed + 200``), and the
    summary is of that re-sampling:

    ``kind`` ("attack" / "random"), ``objective``, ``epsilon``, ``steps`` (attacks) / ``draws`` (random),
    ``iterates_evaluated``, ``images``, ``samples``, ``sources``, ``fresh_latent_seed``, ``attack_latent_seed``,
    ``paper_flag`` (:func:`..clustered.rate` of the paper's per-image flag, unit "sample", resampled by ``source``),
    ``frac_samples_with_artifact``, ``frac_artifact_pixels``, ``frac_nonfinite_pixels``, ``sampled_max_log_slope``
    (fresh latents: the slope to quote), ``score_mean``, ``score_p99``, ``attack_latents_start_max_log_slope`` /
    ``attack_latents_max_log_slope`` (on the search's own fixed latents, which it tuned the input to),
    ``attack_latents_best_objective`` (largest over images) and ``example_panel`` (the array prefix its example is
    kept under, or None).

    Arrays: per budget the worst attack's (:func:`worst_attack`) most broken sample, under ``budget_8_255/`` and
    ``unconstrained/`` (``lr``, ``sample``, ``mask``, ``explosion``, ``attribution``, ``score`` of that image).
    ``source``: ``[B]`` source ids of the crops (None: each crop its own source); ``n_resamples``: source-bootstrap
    resamples of the rates.
    """
    from ..adversarial import OBJECTIVES, AttackConfig, attack, random_search

    source = np.arange(lr.shape[0]) if source is None else np.asarray(source)[: lr.shape[0]]
    out, kept = {}, {}
    for blabel, eps in BUDGETS:
        for objective in OBJECTIVES:
            label = f"{objective}_{blabel}"
            acfg = AttackConfig(epsilon=eps, steps=steps, heat=heat, seed=seed, objective=objective)
            res = attack(flow, lr, acfg, progress=progress)
            fields, tr, score = _resampled(flow, res.lr, scorer, heat, samples, seed, source, n_resamples, True)
            out[label] = {"kind": "attack", "objective": objective, "epsilon": eps, "steps": acfg.steps,
                          "iterates_evaluated": res.evaluated, **fields,
                          "attack_latents_start_max_log_slope": float(res.start_log_slope.max()),
                          "attack_latents_max_log_slope": float(res.best_log_slope.max()),
                          "attack_latents_best_objective": float(res.best_objective.max()),
                          "example_panel": None}
            kept[label] = (tr, res.lr, score)
            if eps == SMALL_BUDGET:
                rnd = random_search(flow, lr, acfg, draws=res.evaluated)
                fields, _, _ = _resampled(flow, rnd.lr, scorer, heat, samples, seed, source, n_resamples, False)
                out[f"random_{label}"] = {"kind": "random", "objective": objective, "epsilon": eps,
                                          "draws": rnd.evaluated, "iterates_evaluated": rnd.evaluated, **fields,
                                          "attack_latents_start_max_log_slope": float(rnd.start_log_slope.max()),
                                          "attack_latents_max_log_slope": float(rnd.best_log_slope.max()),
                                          "attack_latents_best_objective": float(rnd.best_objective.max()),
                                          "example_panel": None}
    arrays = {}
    for panel, blabel in EXAMPLE_PANELS.items():
        worst = worst_attack(out, [f"{o}_{blabel}" for o in OBJECTIVES])
        out[worst]["example_panel"] = panel
        tr, x, score = kept[worst]
        _, b, example = example_arrays(tr, x)
        arrays.update({f"{panel}/{k}": v for k, v in {**example, "score": score[b].numpy()}.items()})
    return out, arrays
