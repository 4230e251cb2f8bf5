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

from .. import correlate as C
from .. import stats as S
from .measure import ModelMeasurement
from .verdict import label


def observations(m: ModelMeasurement) -> S.Observations:
    """Per-position observations over all of the model's conditions (see the module docstring)."""
    scores, events, image = [], [], []
    for k, c in enumerate(m.conditions):
        score = c.arrays["score"]
        scores.append(score.ravel())
        events.append(c.arrays["events"].ravel())
        image.append(np.repeat(np.arange(score.shape[0]) + 1000 * k, score[0].size))
    return S.Observations(np.concatenate(scores), np.concatenate(events), m.samples, np.concatenate(image))


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
                         examples=example_panels(m), image_names=None, notes=[])


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


def gate_text(thr: dict) -> str:
    """The recommended OOD gate of one model, in words."""
    if thr.get("value") is not None:
        return (f"gate inputs at OOD score >= {thr['value']:.3g} (per position; {thr['false_alarm']:.1%} false "
                f"alarms on the stress suite)")
    return f"no gating threshold: {thr.get('undefined')}"


def stress_tables(summaries: list) -> list:
    """One table per model: every condition and adversarial result with artifact rates, max inverse slope (not
    log) and mean OOD score."""
    tables = []
    for s in summaries:
        rows = [[label(c), c["frac_samples_with_artifact"], c["frac_artifact_pixels"], c["frac_nonfinite_pixels"],
                 None if c["max_log_slope"] is None else math.exp(c["max_log_slope"]), c["score_mean"]]
                for c in s["conditions"]]
        for name, a in s["adversarial"].items():
            slope = a.get("found_max_log_slope", a.get("sampled_max_log_slope"))
            rows.append([f"{'random' if name.startswith('random') else 'adversarial'} {name}",
                         a.get("frac_samples_with_artifact"), a["frac_artifact_pixels"], a["frac_nonfinite_pixels"],
                         None if slope is None else math.exp(slope), a.get("score_mean")])
        tables.append({"title": f"Stress suite: {s['name']} ({s['family']}, {s['coupling']}, heat {s['heat']:g})",
                       "columns": ["condition", "samples with artifacts", "artifact pixels", "NaN/Inf pixels",
                                   "max inverse slope", "mean OOD score"], "rows": rows})
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
    notes = [f"Budget '{budget_name}': {budget}. Held-out chelsea crops, degradations of "
             "robustness_diag/data/degradations.py; artifact = any channel > 1.5 or < -0.5 or non-finite; "
             "inverse slopes are natural logs; the OOD statistics are fitted on in-distribution crops."]
    return {**C.report_data(results, ccfg, metrics, notes),
            "verdicts": verdicts,
            "warnings": [w for w in map(settings_warning, summaries) if w]
            + [f"{f['checkpoint']}: not audited: {f['error']}" for f in failures],
            "tables": stress_tables(summaries)}
