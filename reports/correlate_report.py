"""The correlation report: figures and the HTML page drawn from what :mod:`robustness_diag.analyses.correlate`
(and the audit built on it) wrote to a run folder (``report_data.json``, ``examples.npz``).

:func:`rerender` is the ``render`` callable the CLI hands to ``correlate.run``, and what ``robustness-diag report
RUN_DIR`` calls: a finished run is re-drawn without the models. :func:`render` draws from report data in memory:
the CLI hands it to ``audit.run``, which passes the report data and example panels it just computed (nothing is
read back from the run folder).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..analyses.correlate import load_examples
from . import figures as F
from .html import metric_text, render_report


def rerender(run_dir) -> Path:
    """Rebuilds every figure and ``report.html`` of a finished run from ``report_data.json`` (+ ``examples.npz``)."""
    run_dir = Path(run_dir)
    path = run_dir / "report_data.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no report_data.json here; is this the --out folder of 'correlate' "
                                f"or 'audit'?")
    data = numbers_back(json.loads(path.read_text()))
    examples = load_examples(run_dir / "examples.npz") if (run_dir / "examples.npz").is_file() else []
    return render(run_dir, data, examples)


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
#: keys whose values are labels, never numbers (a model or image may be called "nan")
_LABEL_KEYS = {"name", "title", "model", "image", "path", "condition", "checkpoint", "undefined", "notes"}


def numbers_back(obj, key: str = ""):
    """Report data read back from JSON with its non-finite numbers restored: the toolkit writes them as the strings
    ``"nan"``/``"inf"``/``"-inf"`` (:func:`robustness_diag.io.to_jsonable`). A string becomes a float when it is a
    dict value under a key that is not a label, or an entry of a list that holds numbers (a curve's thresholds)."""
    if isinstance(obj, dict):
        return {k: numbers_back(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        numeric = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj)
        return [(_NONFINITE[v] if numeric and isinstance(v, str) and v in _NONFINITE else numbers_back(v, key))
                for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE and key and key not in _LABEL_KEYS:
        return _NONFINITE[obj]
    return obj


def _n(rec: dict, unit: str = "source image") -> str:
    """``"; N = 8 sources"``-style suffix naming a statistic's resampling unit and its count."""
    n = rec.get("n_sources") or (rec.get("interval") or {}).get("n_sources")
    return "" if n is None else f"; resampled by {unit}, N = {n} sources"


def headline_rows(metrics: dict) -> list[dict]:
    """The report's headline block: per model, (label, text) pairs - the image-level numbers first (the unit a gate
    acts on), then within condition, within image, the held-out gate and, last, the pooled per-position numbers."""
    rows = []
    for name, m in metrics.items():
        out = []
        il = m.get("image_level")
        if il:
            out += [(f"Image level: AUROC of the image score vs any artifact ({il['n_images']} images, "
                     f"{il['n_positive_images']} with artifacts)", metric_text(il["auroc"]) + _n(il)),
                    ("Image level: Spearman of the image score vs its artifact fraction",
                     metric_text(il["spearman_vs_artifact_fraction"]) + _n(il))]
        wc = m.get("within_condition")
        if wc:
            st = wc["stratified_auroc"]
            used = ", ".join(st.get("conditions_used", [])) or "none"
            out.append((f"Within condition: AUROC with pairs inside one condition (conditions with both outcomes: "
                        f"{used})", metric_text(st) + _n(wc)))
        wi = m.get("within_image")
        if wi:
            out.append((f"Within image: AUROC with pairs inside one image ({wi.get('n_images_used', 0)} images with "
                        f"both outcomes)", metric_text(wi["auroc"]) + _n(wi)))
        gate = m.get("gate")
        if gate:
            out.append(("Image gate, chosen on half of the sources and judged on the other", gate_summary(gate)))
        if "per_position_unavailable" in m:              # image level only (run folders without maps)
            out += [("Per-position analysis", f"not available: {m['per_position_unavailable']}"),
                    ("observations", f"{m['n_images']} images from {m['n_sources']} independent sources; no "
                                     f"per-position observations")]
            rows.append({"model": name, "metrics": out})
            continue
        caught = "n/a" if m["threshold"].get("tpr") is None else f"{m['threshold']['tpr']:.3f}"
        out += [("Pooled positions across conditions: AUROC (mixes conditions; not a decision number)",
                 metric_text(m["auroc"]) + _n(m)),
                ("Pooled positions: average precision [prevalence baseline]",
                 f"{metric_text(m['average_precision'])} [{m['prevalence']['value']:.4f}]"),
                ("Pooled positions: Spearman (score vs artifact frequency; p-value assumes independent positions)",
                 metric_text(m["score_vs_frequency"]["spearman"])),
                ("Pooled positions: in-sample threshold at "
                 f"{m['threshold'].get('false_alarm_target', 0.05):g} false alarms (chosen and judged on the same "
                 "pairs)", metric_text(m["threshold"]) if m["threshold"].get("value") is None else
                 f"score >= {m['threshold']['value']:.3g} (catches {caught} of artifact pairs)"),
                ("observations", f"{m['n_images']} images from {m.get('n_sources', m['n_images'])} independent "
                                 f"sources, {m['n_positions']} positions, {m['n_events']:.0f} artifact events in "
                                 f"{m['n_trials']:.0f} position-samples")]
        rows.append({"model": name, "metrics": out})
    return rows


def _rate_text(r: dict) -> str:
    if r.get("value") is None:
        return f"undefined ({r.get('undefined')})"
    ci = "" if r.get("ci_low") is None else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    ub = "" if r.get("upper_bound") is None else f" (at most {r['upper_bound']:.2f})"
    return f"{r['k']}/{r['n']} = {r['value']:.2f}{ci}{ub}"


def gate_summary(gate: dict) -> str:
    """One line: the gate's threshold and its held-out catch and false-alarm rates with intervals."""
    if gate.get("value") is None:
        return metric_text(gate)
    h = gate["heldout"]
    if "false_alarm_clean" not in h:
        # no clean condition (e.g. user folders, whose condition is unknown): no clean/degraded split to show
        alarms = f"false alarms {_rate_text(h['false_alarm'])} of the artifact-free images"
    else:
        alarms = (f"false alarms clean {_rate_text(h['false_alarm_clean'])}, degraded artifact-free "
                  f"{_rate_text(h['false_alarm_degraded'])}")
    return (f"score >= {gate['value']:.3g} (target {gate['false_alarm_target']:.0%} false alarms); held out "
            f"({gate['n_images_judge']} images, {gate['n_sources_judge']} sources): catches "
            f"{_rate_text(h['catch_rate'])}, {alarms}")


def granularity_tables(name: str, m: dict) -> list[dict]:
    """Per-condition AUROCs and the score-versus-border profile of one model, when computed."""
    tables = []
    wc = m.get("within_condition")
    if wc:
        tables.append({"title": f"Within condition: {name} (position AUROC inside each condition)",
                       "columns": ["condition", "AUROC", "CI low", "CI high", "images", "sources", "artifact events",
                                   "position-samples"],
                       "rows": [[r["condition"], r.get("value", r.get("undefined")), r.get("ci_low"), r.get("ci_high"),
                                 r["n_images"], r["n_sources"], r["n_events"], r["n_trials"]]
                                for r in wc["per_condition"]]})
    if m.get("border_profile"):
        tables.append({"title": f"Score against distance to the border, clean images: {name}",
                       "columns": ["positions from the border", "positions", "mean", "p99", "max"],
                       "rows": [[r["distance"], r["positions"], r["mean"], r["p99"], r["max"]]
                                for r in m["border_profile"]]})
    return tables


def per_image_table(name: str, rows: list) -> dict:
    """The per-image table: the image-level rows (source, condition, flagged samples) when the run has them, else
    the score summaries of :func:`robustness_diag.analyses.stats.per_image_table`."""
    if rows and "flagged" in rows[0]:
        return {"title": f"Per image: {name}",
                "columns": ["image", "source", "image score (interior mean)", "flagged samples", "artifact fraction"],
                "rows": [[r.get("name") or r["image"], r["source"], r["score_mean"], f"{r['flagged']}/{r['samples']}",
                          r["artifact_fraction"]] for r in rows]}
    return {"title": f"Per image: {name}", "columns": ["image", "mean score", "p99 score", "max score",
                                                        "artifact fraction"],
            "rows": [[r.get("name", r["image"]), r["score_mean"], r["score_p99"], r["score_max"],
                      r["artifact_fraction"]] for r in rows]}


#: figures drawn from per-position observations only
POOLED_FIGURES = ("reliability", "roc_pr", "score_histograms")


def render(out: Path, data: dict, examples: list) -> Path:
    """Draws every figure (PNG + CSV sidecar) and writes ``out/report.html`` from report data; returns its path."""
    metrics = data["metrics"]
    # models without per-position observations (no maps) have image-level statistics only: no pooled figures
    pooled = {k: m for k, m in metrics.items() if "per_position_unavailable" not in m}
    hists = {k: h for k, h in data["histograms"].items() if k in pooled}
    figs = [F.reliability(pooled, out), F.roc_pr(pooled, out)] if pooled else []
    if hists:
        figs.append(F.score_histograms(hists, out))
    drawn = {"reliability", "roc_pr"} if pooled else set()
    drawn |= {"score_histograms"} if hists else set()
    drawn |= {"examples"} if examples else set()
    for name in set(POOLED_FIGURES + ("examples",)) - drawn:   # an earlier run's files must not pass for this one's
        for path in (out / f"{name}.png", out / f"{name}.csv"):
            path.unlink(missing_ok=True)
    figs.append(F.per_image_scatter({k: m["per_image"] for k, m in metrics.items()}, out))
    notes = list(data.get("notes", []))
    if len(pooled) < len(metrics):
        notes.append("no maps: per-position analysis not available for " + ", ".join(
            k for k in metrics if k not in pooled) + "; the reliability, ROC/PR and score-histogram figures "
            + ("show the other models only" if pooled else "are not drawn") + ".")
    if data["layer_traces"]:
        figs.append(F.layer_traces(data["layer_traces"], out, data.get("slope_bounds")))
    if examples:
        figs.append(F.example_panel(examples, out))
    tables = list(data.get("tables", [])) + [t for name, m in metrics.items() for t in granularity_tables(name, m)] + [
        per_image_table(name, m["per_image"]) for name, m in metrics.items()]
    return render_report(out / "report.html", data["title"], headline_rows(metrics), figs, tables,
                         notes=notes, config=data.get("config"),
                         warnings=data.get("warnings", []), verdicts=data.get("verdicts", []))
