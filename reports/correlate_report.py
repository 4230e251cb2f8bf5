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


def headline_rows(metrics: dict) -> list[dict]:
    """The report's headline block: per model, (label, text) pairs of the main statistics."""
    rows = []
    for name, m in metrics.items():
        thr = m["threshold"]
        caught = "n/a" if thr.get("tpr") is None else f"{thr['tpr']:.3f}"
        thr_text = metric_text(thr) if thr.get("value") is None else (
            f"score >= {thr['value']:.3g} (false alarms {thr['false_alarm']:.3f}, catches {caught} of artifacts)")
        rows.append({"model": name, "metrics": [
            ("AUROC (artifact = positive), 95% CI by image bootstrap", metric_text(m["auroc"])),
            ("average precision [prevalence baseline]",
             f"{metric_text(m['average_precision'])} [{m['prevalence']['value']:.4f}]"),
            ("FPR at 95% TPR", metric_text(m["fpr_at_95_tpr"])),
            ("Spearman (score vs artifact frequency)", metric_text(m["score_vs_frequency"]["spearman"])),
            ("Kendall tau-b", metric_text(m["score_vs_frequency"]["kendall"])),
            (f"recommended threshold at {m['threshold'].get('false_alarm_target', 0.05):g} false alarms", thr_text),
            ("observations", f"{m['n_images']} images, {m['n_positions']} positions, "
                             f"{m['n_events']:.0f} artifact events in {m['n_trials']:.0f} position-samples"),
        ]})
    return rows


def render(out: Path, data: dict, examples: list) -> Path:
    """Draws every figure (PNG + CSV sidecar) and writes ``out/report.html`` from report data; returns its path."""
    metrics = data["metrics"]
    figs = [F.reliability(metrics, out), F.roc_pr(metrics, out), F.score_histograms(data["histograms"], out),
            F.per_image_scatter({k: m["per_image"] for k, m in metrics.items()}, out)]
    if data["layer_traces"]:
        figs.append(F.layer_traces(data["layer_traces"], out, data.get("slope_bounds")))
    if examples:
        figs.append(F.example_panel(examples, out))
    tables = list(data.get("tables", [])) + [
        {"title": f"Per image: {name}", "columns": ["image", "mean score", "p99 score", "max score",
                                                      "artifact fraction"],
         "rows": [[r.get("name", r["image"]), r["score_mean"], r["score_p99"], r["score_max"], r["artifact_fraction"]]
                  for r in m["per_image"]]} for name, m in metrics.items()]
    return render_report(out / "report.html", data["title"], headline_rows(metrics), figs, tables,
                         notes=data.get("notes", []), config=data.get("config"),
                         warnings=data.get("warnings", []), verdicts=data.get("verdicts", []))
