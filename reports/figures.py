"""Figures of the correlation report, each written as a PNG plus a CSV sidecar holding exactly the plotted numbers.

Every function takes ``runs``: an ordered mapping ``model name -> result`` where ``result`` is the output of
:func:`robustness_diag.analyses.stats.correlate` (plus, where noted, per-image rows or per-layer traces). Several
models are overlaid in one figure (the affine vs RQ-spline side-by-side). Matplotlib runs headless (Agg); seaborn
draws the per-image scatter (one colour per model). The histograms stay matplotlib: their input is pre-binned.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from robustness_diag.io import atomic_write, atomic_write_text

PALETTE = ["#c0392b", "#2471a3", "#229954", "#7d3c98", "#b9770e", "#566573"]


@dataclass
class Figure:
    """A written figure: ``png`` and ``csv`` paths, a title and a caption that says how to read it."""

    name: str
    title: str
    caption: str
    png: Path
    csv: Optional[Path]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)
    return path


def write_csv(path: Path, rows: Iterable[Mapping]) -> Path:
    """Write dict rows (union of keys, first-seen order) to ``path`` atomically."""
    rows = list(rows)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _ci_text(m: dict) -> str:
    if m.get("value") is None:
        return "undefined"
    if m.get("ci_low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def reliability(runs: Mapping[str, dict], out_dir: Path) -> Figure:
    """P(artifact | score bin) with source-bootstrap intervals, isotonic and logistic fits, prevalence dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = []
    for color, (name, r) in zip(PALETTE, runs.items()):
        bins = r["reliability"]
        x = np.array([b["score_mean"] for b in bins])
        y = np.array([b["rate"] for b in bins])
        # no interval (a single source image): no bar
        lo = np.array([b["rate"] if b["ci_low"] is None else b["ci_low"] for b in bins], np.float64)
        hi = np.array([b["rate"] if b["ci_high"] is None else b["ci_high"] for b in bins], np.float64)
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", color=color, capsize=3, label=f"{name}: binned rate")
        ax.plot(r["isotonic"]["score"], r["isotonic"]["p"], color=color, lw=1.5, alpha=0.8)
        if r["logistic"].get("value") is not None:
            ax.plot(r["logistic"]["score"], r["logistic"]["p"], color=color, lw=1, ls="--", alpha=0.8)
        ax.axhline(r["prevalence"]["value"], color=color, lw=0.8, ls=":")
        rows += [{"model": name, **b} for b in bins]
    ax.set_xlabel("OOD score (Mahalanobis distance), bin mean")
    ax.set_ylabel("P(artifact | score bin)")
    ax.set_title("Reliability: artifact rate rises with the OOD score?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure("reliability", "Artifact probability by OOD-score bin",
                  "Pooled over every position of every image and condition. Equal-count score bins; bars are 95% "
                  "intervals resampling whole source images (none with a single source); solid line: isotonic fit, "
                  "dashed: logistic fit, dotted: overall prevalence. Pooled across conditions, a rising curve mostly "
                  "says that harsher conditions score higher and break more; whether the score points at the "
                  "positions that break is the within-condition and within-image AUROC of the headline.",
                  _save(fig, out_dir, "reliability"), write_csv(Path(out_dir) / "reliability.csv", rows))


def roc_pr(runs: Mapping[str, dict], out_dir: Path) -> Figure:
    """ROC (chance diagonal, FPR@95%TPR marked) and precision-recall (prevalence baseline) side by side."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    rows = []
    for color, (name, r) in zip(PALETTE, runs.items()):
        c = r["curves"]
        if "undefined" in c:
            a.plot([], [], color=color, label=f"{name}: {c['undefined']}")
            continue
        a.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=color, label=f"{name}: AUROC {_ci_text(r['auroc'])}")
        f95 = r["fpr_at_95_tpr"]["value"]
        a.plot([f95], [0.95], marker="x", color=color, ms=8)
        b.plot(c["pr"]["recall"], c["pr"]["precision"], color=color,
               label=f"{name}: AP {_ci_text(r['average_precision'])}")
        b.axhline(r["prevalence"]["value"], color=color, ls=":", lw=0.8)
        rows += [{"model": name, "curve": "roc", "fpr": x, "tpr": y, "threshold": t}
                 for x, y, t in zip(c["roc"]["fpr"], c["roc"]["tpr"], c["roc"]["threshold"])]
        rows += [{"model": name, "curve": "pr", "recall": x, "precision": y, "threshold": t}
                 for x, y, t in zip(c["pr"]["recall"], c["pr"]["precision"], c["pr"]["threshold"])]
    a.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    a.set(xlabel="false-positive rate (clean flagged)", ylabel="true-positive rate (artifacts caught)", title="ROC")
    b.set(xlabel="recall", ylabel="precision", title="Precision-recall (dotted: prevalence)", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:      # no curve when every model's metrics are undefined
            ax.legend(fontsize=7, loc="lower right" if ax is a else "upper right")
    return Figure("roc_pr", "ROC and precision-recall, artifact = positive",
                  "Observations are (position, sample) pairs pooled over every image and condition; intervals are 95% "
                  "bootstrap over source images. x on the ROC marks FPR at 95% TPR. At low prevalence read the PR "
                  "curve: ROC can look good while PR collapses. Pooled curves reward telling conditions apart; the "
                  "headline's image-level and within-condition numbers answer the questions a user acts on.",
                  _save(fig, out_dir, "roc_pr"), write_csv(Path(out_dir) / "roc_pr.csv", rows))


def score_histograms(hists: Mapping[str, dict], out_dir: Path) -> Figure:
    """Class-conditional score histograms (artifact vs clean observations), density-normalised.

    ``hists[name]`` = ``{"edges": [K+1], "artifact": [K], "clean": [K]}`` (weighted counts).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(hists), figsize=(5 * len(hists), 3.8), squeeze=False)
    rows = []
    for ax, (name, h) in zip(axes[0], hists.items()):
        edges = np.asarray(h["edges"])
        for label, color in (("clean", "#2471a3"), ("artifact", "#c0392b")):
            counts = np.asarray(h[label], np.float64)
            dens = counts / max(counts.sum(), 1e-300) / np.diff(edges)
            ax.stairs(dens, edges, color=color, fill=True, alpha=0.35, label=f"{label} ({counts.sum():.0f})")
            rows += [{"model": name, "class": label, "lo": lo, "hi": hi, "count": c}
                     for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
        ax.set(title=name, xlabel="OOD score", ylabel="density")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return Figure("score_histograms", "Score distributions of artifact and clean observations",
                  "Density of the OOD score at positions that became artifacts vs stayed clean (log scale), pooled "
                  "over conditions. Gating is decided per image: see the held-out image gate in the headline.",
                  _save(fig, out_dir, "score_histograms"), write_csv(Path(out_dir) / "score_histograms.csv", rows))


def per_image_scatter(tables: Mapping[str, list[dict]], out_dir: Path) -> Figure:
    """Per-image mean OOD score vs artifact fraction (``rows`` from ``stats.per_image_table`` plus a ``name``)."""
    plt = _plt()
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    palette = dict(zip(tables, PALETTE))       # one colour per model, in the given order (at most len(PALETTE))
    rows = [{"model": model, **t} for model in palette for t in tables[model]]
    data = {k: [r[k] for r in rows] for k in ("model", "score_mean", "artifact_fraction")}
    ax.set_yscale("symlog", linthresh=1e-4)
    if rows:
        sns.scatterplot(data=data, x="score_mean", y="artifact_fraction", hue="model", hue_order=list(palette),
                        palette=palette, s=18, alpha=0.7, edgecolor="face", linewidth=plt.rcParams["lines.linewidth"],
                        ax=ax)
        sns.move_legend(ax, "best", fontsize=8, title=None)
    ax.set(xlabel="OOD score of the image (mean)", ylabel="artifact fraction (pixels x samples)",
           title="Per image: OOD score vs artifacts")
    ax.grid(alpha=0.3)
    return Figure("per_image", "Per-image OOD score vs artifact fraction",
                  "One point per input image (and model): the image-level question. Images to the right are further "
                  "from the training data; the headline's image-level AUROC and Spearman rho summarise this plot.",
                  _save(fig, out_dir, "per_image"), write_csv(Path(out_dir) / "per_image.csv", rows))


def layer_traces(traces: Mapping[str, list[dict]], out_dir: Path, bound: Optional[Mapping[str, float]] = None
                 ) -> Figure:
    """Per-layer largest inverse log-slope, in sampling order, one line per model (and condition).

    ``traces[label]`` = rows ``{"layer": name, "max_log_slope": float}`` in sampling order; ``bound[label]`` draws
    the coupling's analytic bound (e.g. log 1e4 for affine with eps 1e-4) as a dashed line.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    rows = []
    for color, (label, tr) in zip(PALETTE * 4, traces.items()):
        y = np.array([t["max_log_slope"] for t in tr], np.float64)
        ax.plot(range(len(y)), y, marker=".", color=color, label=label)
        if bound and label in bound:
            ax.axhline(bound[label], color=color, ls="--", lw=0.8)
        rows += [{"trace": label, "index": i, **t} for i, t in enumerate(tr)]
    if traces:
        names = [t["layer"] for t in next(iter(traces.values()))]
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=6)
    ax.set(ylabel="max log inverse slope", title="Where the inverse explodes: per-layer inverse slopes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Figure("layer_traces", "Per-layer inverse slopes while sampling",
                  "Largest log inverse slope (log of 1/scale for affine couplings) per coupling sub-transform, in "
                  "sampling order; dashed lines are the couplings' analytic bounds.",
                  _save(fig, out_dir, "layer_traces"), write_csv(Path(out_dir) / "layer_traces.csv", rows))


def example_panel(examples: list[dict], out_dir: Path, name: str = "examples") -> Figure:
    """Qualitative grid, one row per example: LR | sample | artifact mask | OOD map | explosion map | attribution.

    Each example: ``{"title": str, "lr": [h,w,3], "sample": [H,W,3] (unclamped), "mask": [H,W] bool,
    "ood": [h,w], "explosion": [H,W], "attribution": [H,W] int (-1 = none)}``; missing entries are left blank.
    OOD maps share one colour scale across rows (given as ``ood_range`` on the first example or computed).
    """
    plt = _plt()
    cols = [("lr", "LR input"), ("sample", "sample"), ("mask", "artifact mask"), ("ood", "OOD score"),
            ("explosion", "explosion map"), ("attribution", "first exploding layer")]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(2.4 * len(cols), 2.4 * len(examples)),
                             squeeze=False)
    oods = [np.asarray(e["ood"]) for e in examples if e.get("ood") is not None]
    vmin, vmax = (min(o.min() for o in oods), max(o.max() for o in oods)) if oods else (0, 1)
    rows = []
    for r, ex in enumerate(examples):
        for c, (key, label) in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            v = ex.get(key)
            if v is None:
                continue
            v = np.asarray(v)
            if key in ("lr", "sample"):
                ax.imshow(np.clip(np.nan_to_num(v, nan=1.0), 0, 1))
            elif key == "mask":
                ax.imshow(v, cmap="gray", vmin=0, vmax=1)
            elif key == "ood":
                im = ax.imshow(v, cmap="magma", vmin=vmin, vmax=vmax)
                fig.colorbar(im, ax=ax, fraction=0.046)
            elif key == "explosion":
                im = ax.imshow(np.nan_to_num(v, nan=np.nanmax(v) if np.isfinite(v).any() else 0), cmap="inferno")
                fig.colorbar(im, ax=ax, fraction=0.046)
            else:
                im = ax.imshow(np.ma.masked_less(v, 0), cmap="tab20")
                fig.colorbar(im, ax=ax, fraction=0.046)
        axes[r, 0].set_ylabel(str(ex.get("title", r)), fontsize=8)
        rows.append({"row": r, "title": ex.get("title", ""),
                     "artifact_pixels": int(np.asarray(ex["mask"]).sum()) if ex.get("mask") is not None else "",
                     "ood_max": float(np.max(ex["ood"])) if ex.get("ood") is not None else ""})
    return Figure(name, "Examples", "Per row: the LR input, one sample (clamped for display), its artifact mask, the "
                  "OOD score map (shared colour scale), the explosion map and the first layer whose activation "
                  "exploded at each pixel.", _save(fig, out_dir, name), write_csv(Path(out_dir) / f"{name}.csv", rows))


