"""Shaping the measurements for the outputs: per-model summaries (``audit.json``), the correlate observations and
example panels, and the report data (statistics, verdicts, stress tables, notes) the report layer draws.

Observations: one "image" per condition x held-out crop (image id ``1000 * condition index + crop index``), one
position per OOD-score cell (feature grid), ``events`` = samples (of ``samples``) with an artifact in the cell's HR
block. Example panels: the worst degradation's and the 8/255 adversarial search's most broken sample (``lr``
``[h, w, 3]``, ``sample`` ``[H, W, 3]``, ``mask``/``explosion``/``attribution`` ``[H, W]``, ``ood`` ``[h', w']``).
The report data has the keys of :func:`robustness_diag.analyses.correlate.run`'s (``title``, ``config``,
``metrics``, ``histograms``, ``layer_traces``, ``slope_bounds``, ``notes``, ``n_examples``) plus ``verdicts``,
``warnings`` and ``tables``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from robustness_diag.ood.borders import DEFAULT_BORDER_MARGIN, border_distance, interior_mask

from .. import clustered as K
from .. import correlate as C
from .. import stats as S
from .measure import ModelMeasurement
from .verdict import label


def observations(m: ModelMeasurement) -> S.Observations:
    """Per-position observations over all of the model's conditions (see the module docstring), with each
    position's source photo and condition."""
    scores, events, image, source, cond = [], [], [], [], []
    for k, c in enumerate(m.conditions):
        score = c.arrays["score"]
        per = score[0].size
        scores.append(score.ravel())
        events.append(c.arrays["events"].ravel())
        image.append(np.repeat(np.arange(score.shape[0]) + 1000 * k, per))
        source.append(np.repeat(_sources(c), per))
        cond.append(np.full(score.size, c.summary["condition"]))
    return S.Observations(np.concatenate(scores), np.concatenate(events), m.samples, np.concatenate(image),
                          source=np.concatenate(source), condition=np.concatenate(cond))


def _sources(c) -> np.ndarray:
    """The source ids ``[B]`` of a condition's images (each image its own source in caches without them)."""
    src = c.arrays.get("source")
    return np.arange(c.arrays["score"].shape[0]) if src is None else np.asarray(src)


def image_score(score_map: np.ndarray, border_margin: int = DEFAULT_BORDER_MARGIN) -> float:
    """An image's aggregate OOD score: the mean of its score map ``[h, w]`` over the positions at least
    ``border_margin`` positions from the border (the conditioner's zero padding inflates border scores)."""
    return float(score_map[interior_mask(*score_map.shape, border_margin)].mean())


def image_table(m: ModelMeasurement, border_margin: int = DEFAULT_BORDER_MARGIN) -> K.ImageTable:
    """One row per (condition, crop) input image: source, condition, :func:`image_score`, samples drawn, samples
    flagged by the paper's criterion and artifact fraction."""
    src, cond, score, samples, flagged, frac, names = [], [], [], [], [], [], []
    for c in m.conditions:
        z = c.arrays
        B = z["score"].shape[0]
        src.append(_sources(c))
        cond += [c.summary["condition"]] * B
        score += [image_score(z["score"][b], border_margin) for b in range(B)]
        samples.append(z["samples"])
        flagged.append(z["flagged"])
        frac.append(z["artifact_fraction"])
        names += [f"{c.summary['condition']}/{b}" for b in range(B)]
    return K.ImageTable(np.concatenate(src), np.array(cond), np.array(score), np.concatenate(samples),
                        np.concatenate(flagged), np.concatenate(frac), names)


def border_positions(m: ModelMeasurement) -> dict:
    """Per position (in :func:`observations` order): distance to the border and whether its image is clean."""
    dist, clean = [], []
    for c in m.conditions:
        B, h, w = c.arrays["score"].shape
        dist.append(np.tile(border_distance(h, w).ravel(), B))
        clean.append(np.full(B * h * w, c.summary["condition"] == "clean"))
    return {"distance": np.concatenate(dist), "clean": np.concatenate(clean)}


def worst_condition(m: ModelMeasurement):
    """The condition with the most non-finite, then the most artifact pixels (the first such in suite order)."""
    return max(m.conditions, key=lambda c: (c.summary["frac_nonfinite_pixels"], c.summary["frac_artifact_pixels"]))


def example_panels(m: ModelMeasurement) -> list:
    """The two example panels: the worst degradation's and the 8/255 adversarial search's."""
    worst = worst_condition(m)
    z = worst.arrays
    panels = [{"title": f"worst degradation: {worst.summary['condition']}", "lr": z["lr"], "sample": z["sample"],
               "mask": z["mask"], "ood": z["score"][int(z["example_image"])], "explosion": z["explosion"],
               "attribution": z["attribution"]}]
    a = {k.split("/", 1)[1]: v for k, v in m.adversarial_arrays.items() if k.startswith("budget_8_255/")}
    panels.append({"title": "adversarial 8/255", "lr": a["lr"], "sample": a["sample"], "mask": a["mask"],
                   "ood": a["score"], "explosion": a["explosion"], "attribution": a["attribution"]})
    return panels


def model_result(m: ModelMeasurement) -> C.ModelResult:
    """The model's correlate input: observations, clean and worst-condition layer traces, slope bound, examples."""
    worst = worst_condition(m).summary
    traces = {"clean": m.static["layer_trace_clean"], worst["condition"]: worst["layer_trace"]}
    return C.ModelResult(m.name, observations(m), layer_traces=traces, slope_bound=m.static["bound_log_slope"],
                         examples=example_panels(m), image_names=None, notes=[], images=image_table(m),
                         border=border_positions(m))


def summary(m: ModelMeasurement, verdict: dict, threshold: Optional[dict] = None) -> dict:
    """The model's entry in ``audit.json``: identity, static checks (without the full ``inspect`` report), condition
    rows, adversarial summaries, the verdict (``verdict``, ``reasons``, ``caveats``), the OOD fit report and, when
    the statistics were computed, the ``recommended_threshold``."""
    s = {"checkpoint": m.spec, "name": m.name, "coupling": m.coupling, "family": m.family, "heat": m.heat,
         "static": {k: v for k, v in m.static.items() if k != "inspect"},
         "inspect_verdict": m.static["inspect"].get("verdict"), "conditions": [c.summary for c in m.conditions],
         "adversarial": m.adversarial, **verdict, "ood_fit": m.fit_report, "settings": settings(m)}
    if threshold is not None:
        s["recommended_threshold"] = threshold
    return s


def settings(m: ModelMeasurement) -> dict:
    """What ``inspect`` says about the checkpoint's settings: ``defaulted`` (names the weights cannot tell, e.g.
    stacked RRDB block indices, eps, S), ``defaulted_values`` (the values assumed), ``inferred`` (read from shapes)."""
    insp = m.static.get("inspect", {})
    return {"defaulted": list(insp.get("defaulted", [])), "defaulted_values": dict(insp.get("defaulted_values", {})),
            "inferred": list(insp.get("inferred", []))}


def settings_warning(s: dict) -> Optional[str]:
    """One line for a model whose verdict rests on defaulted settings (None when nothing was defaulted)."""
    d = s.get("settings", {})
    if not d.get("defaulted"):
        return None
    vals = d.get("defaulted_values", {})
    shown = ", ".join(f"{k}={vals.get(k)!r}" if k in vals else k for k in d["defaulted"])
    return (f"{s['name']}: the weights cannot tell {shown}; these settings were defaulted and every number for this "
            f"model assumes them (pass --config with the checkpoint's original YAML to set them)")


def _pct(r: dict) -> str:
    """``"3 of 20 (15.0%, 95% CI 2.0-40.0%, 6 sources)"`` for a rate record of :func:`.clustered.rate`."""
    if r.get("value") is None:
        return f"undefined ({r.get('undefined')})"
    ci = "" if r.get("ci_low") is None else f", CI {r['ci_low']:.1%}-{r['ci_high']:.1%}"
    ub = "" if r.get("upper_bound") is None else f", at most {r['upper_bound']:.1%}"
    return f"{r['k']} of {r['n']} ({r['value']:.1%}{ci}{ub}; {r['n_sources']} sources)"


def gate_text(gate: Optional[dict]) -> str:
    """The recommended image-level OOD gate of one model and how it held up out of sample, in words."""
    if not gate or gate.get("value") is None:
        return f"no gating threshold: {(gate or {}).get('undefined', 'not computed')}"
    h = gate["heldout"]
    return (f"gate an image when its OOD score (mean over interior positions) is >= {gate['value']:.3g}: chosen for "
            f"{gate['false_alarm_target']:.0%} false alarms on {gate['n_images_choose']} images of "
            f"{gate['n_sources_choose']} sources; on {gate['n_images_judge']} held-out images of "
            f"{gate['n_sources_judge']} other sources it caught {_pct(h['catch_rate'])} images with artifacts and "
            f"gated {_pct(h['false_alarm_clean'])} clean and {_pct(h['false_alarm_degraded'])} artifact-free "
            f"degraded images")


def stress_tables(summaries: list) -> list:
    """One table per model: every condition and adversarial result with the per-sample rate of the paper's flag
    (k/n, interval, upper bound for zero events), artifact and NaN/Inf pixel fractions, max inverse slope (not log,
    adversarial rows on fresh latents) and mean OOD score."""
    tables = []
    for s in summaries:
        rows = [[label(c), K.rate_cell(c.get("paper_flag")), c["frac_artifact_pixels"], c["frac_nonfinite_pixels"],
                 None if c["max_log_slope"] is None else math.exp(c["max_log_slope"]), c["score_mean"]]
                for c in s["conditions"]]
        for name, a in s["adversarial"].items():
            slope = a.get("sampled_max_log_slope")
            kind = "random baseline" if a.get("kind") == "random" else "adversarial"
            rows.append([f"{kind} {name}", K.rate_cell(a.get("paper_flag")), a["frac_artifact_pixels"],
                         a["frac_nonfinite_pixels"], None if slope is None else math.exp(slope), a.get("score_mean")])
        tables.append({"title": f"Stress suite: {s['name']} ({s['family']}, {s['coupling']}, heat {s['heat']:g})",
                       "columns": ["condition", "samples flagged (paper's criterion)", "artifact pixels",
                                   "NaN/Inf pixels", "max inverse slope", "mean OOD score"], "rows": rows})
    return tables


def correlate_config(out: str, budget: dict, false_alarm: float, seed: int, names: list) -> C.CorrelateConfig:
    """The correlation statistics' settings for the audit report."""
    return C.CorrelateConfig(out=str(out), n_resamples=budget["bootstrap"], false_alarm=false_alarm, seed=seed,
                             title="Checkpoint audit: " + ", ".join(names))


def report_data(results: list, metrics: dict, ccfg: C.CorrelateConfig, summaries: list, failures: list,
                budget_name: str, budget: dict) -> dict:
    """Everything the report is drawn from (see the module docstring). ``results``: :class:`C.ModelResult` per
    model; ``metrics``: :func:`C.analyse` of them; ``summaries``: the final ``audit.json`` entries."""
    verdicts = [{"model": s["name"], "verdict": s["verdict"],
                 "reasons": s["reasons"] + s["caveats"] + [gate_text(s["recommended_threshold"])]} for s in summaries]
    notes = [f"Budget '{budget_name}': {budget}. Held-out crops of four source photos never trained on (chelsea, "
             "china, flower, grace_hopper; crops taken in turn) and synthetic graphics images (each its own source), "
             "degradations of robustness_diag/data/degradations.py; artifact = any channel > 1.5 or < -0.5 or "
             "non-finite, and a sample is flagged (the paper's per-image criterion) when it has any artifact pixel; "
             "inverse slopes are natural logs; the OOD statistics are fitted on in-distribution crops of the "
             "training photos of the same size as the stress crops.",
             "Every interval resamples whole source images (all crops and conditions of one photo together) with "
             f"{ccfg.n_resamples} resamples; N is the number of independent sources. The image score is the mean "
             f"OOD score over positions at least {DEFAULT_BORDER_MARGIN} position(s) from the border."]
    return {**C.report_data(results, ccfg, metrics, notes),
            "verdicts": verdicts,
            "warnings": [w for w in map(settings_warning, summaries) if w]
            + [f"{f['checkpoint']}: not audited: {f['error']}" for f in failures],
            "tables": stress_tables(summaries)}
