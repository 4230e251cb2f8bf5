"""Does the OOD score predict where the flow breaks? Statistics of a per-position score against artifact events.

Data model (all 1-D arrays of one length ``N``, one entry per position - an LR-grid cell of one image):

* ``score``: the OOD score at the position (Mahalanobis distance, higher = more OOD; any real value);
* ``events``: in how many of the image's samples the position was an artifact (integer, ``0 <= events <= trials``);
* ``trials``: how many samples were drawn for that image (integer >= 1);
* ``image``: an integer id of the image the position belongs to;
* ``source`` (optional, default ``image``): an integer id of the independent source photo the image was made from
  (crops and degraded copies of one photo share it; the unit of resampling);
* ``condition`` (optional): the stress condition of the image (strings), for the within-condition statistics of
  :mod:`.clustered`.

Each position contributes ``events`` positive and ``trials - events`` negative observations at its score, so the
metrics are those of the pooled (position, sample) pairs with artifact as the positive class. Scores are ranked, never
squashed (a sigmoid on raw distances saturates and ties everything). Confidence intervals come from
a bootstrap over source images (neighbouring positions, and the crops and conditions of one photo, are correlated,
so resampling positions or crops would understate them). These pooled statistics mix conditions: the questions a
reader acts on (image level, within condition, within image) are in :mod:`.clustered`.

A metric that is not defined on the data (AUROC with no artifact at all, a correlation with a constant variable) is
reported as ``{"value": None, "undefined": "<reason>"}``, never as a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy import stats as sps

UNDEFINED_NO_POSITIVE = "no artifact events: every position is clean"
UNDEFINED_NO_NEGATIVE = "no clean observations: every position is an artifact in every sample"


@dataclass
class Observations:
    """Per-position observations (see module docstring); validated and converted to numpy on construction."""

    score: np.ndarray
    events: np.ndarray
    trials: np.ndarray
    image: np.ndarray
    source: Optional[np.ndarray] = None
    condition: Optional[np.ndarray] = None

    def __post_init__(self):
        self.score = np.asarray(self.score, dtype=np.float64).ravel()
        n = self.score.size
        self.events = _as_len(self.events, n, "events", np.float64)
        self.trials = _as_len(self.trials, n, "trials", np.float64)
        self.image = _as_len(self.image, n, "image", np.int64)
        self.source = self.image.copy() if self.source is None else _as_len(self.source, n, "source", np.int64)
        self.condition = None if self.condition is None else _as_len(self.condition, n, "condition", str)
        if not np.all(np.isfinite(self.score)):
            raise ValueError("score contains NaN or inf; drop those positions or give them a finite score")
        if np.any(self.trials < 1) or np.any(self.events < 0) or np.any(self.events > self.trials):
            raise ValueError("need 0 <= events <= trials and trials >= 1 at every position")

    @property
    def positives(self) -> np.ndarray:
        return self.events

    @property
    def negatives(self) -> np.ndarray:
        return self.trials - self.events

    @property
    def rate(self) -> np.ndarray:
        """Artifact frequency per position, ``events / trials`` in [0, 1]."""
        return self.events / self.trials

    @property
    def prevalence(self) -> float:
        return float(self.events.sum() / self.trials.sum())


def _as_len(x, n: int, name: str, dtype) -> np.ndarray:
    a = np.asarray(x, dtype=dtype).ravel()
    if a.size == 1 and n != 1:
        a = np.full(n, a.item(), dtype=dtype)
    if a.size != n:
        raise ValueError(f"{name} has {a.size} entries, score has {n}")
    return a


def undefined(reason: str) -> dict:
    return {"value": None, "undefined": reason}


# -- threshold-free discrimination (weighted, exact; ties count one half) ------------------------------------------
@dataclass
class _Ranked:
    """Scores sorted into unique values (descending) once, so that resampled weights cost one bincount."""

    inverse: np.ndarray   # [N] index of each position's unique score (0 = highest)
    thresholds: np.ndarray  # [U] unique scores, descending

    @classmethod
    def of(cls, score: np.ndarray) -> "_Ranked":
        uniq, inv = np.unique(-score, return_inverse=True)
        return cls(inv.ravel(), -uniq)

    def sums(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.inverse, weights=w, minlength=self.thresholds.size)


def _discrimination(ranked: _Ranked, pos_w: np.ndarray, neg_w: np.ndarray) -> dict:
    """AUROC, average precision and FPR at 95% TPR from per-position positive/negative weights."""
    p, n = ranked.sums(pos_w), ranked.sums(neg_w)
    P, N = p.sum(), n.sum()
    if P <= 0:
        return {k: undefined(UNDEFINED_NO_POSITIVE) for k in ("auroc", "average_precision", "fpr_at_95_tpr")}
    if N <= 0:
        return {k: undefined(UNDEFINED_NO_NEGATIVE) for k in ("auroc", "average_precision", "fpr_at_95_tpr")}
    tp, fp = np.cumsum(p), np.cumsum(n)
    # P(score_pos > score_neg) + 1/2 P(equal): negatives strictly below a positive's score, half the tied ones.
    neg_below = N - fp
    auroc = float(np.sum(p * (neg_below + 0.5 * n)) / (P * N))
    # Step-wise average precision (scikit-learn's definition): sum over thresholds of delta-recall x precision.
    precision = tp / np.maximum(tp + fp, 1e-300)
    ap = float(np.sum((p / P) * precision))
    tpr = tp / P
    first = int(np.searchsorted(tpr, 0.95 - 1e-12))  # first threshold reaching TPR >= 0.95
    fpr95 = float(fp[min(first, fp.size - 1)] / N)
    return {"auroc": {"value": auroc}, "average_precision": {"value": ap}, "fpr_at_95_tpr": {"value": fpr95}}


def curves(obs: Observations, max_points: int = 400) -> dict:
    """ROC and precision-recall curve points (artifact = positive), thinned to at most ``max_points`` each.

    Returns ``{"roc": {"fpr", "tpr", "threshold"}, "pr": {"recall", "precision", "threshold"}}`` as lists, or
    ``{"undefined": reason}`` when one class is absent.
    """
    ranked = _Ranked.of(obs.score)
    p, n = ranked.sums(obs.positives), ranked.sums(obs.negatives)
    if p.sum() <= 0:
        return undefined(UNDEFINED_NO_POSITIVE)
    if n.sum() <= 0:
        return undefined(UNDEFINED_NO_NEGATIVE)
    tp, fp = np.cumsum(p), np.cumsum(n)
    keep = np.unique(np.linspace(0, tp.size - 1, min(max_points, tp.size)).round().astype(int))
    thr = ranked.thresholds[keep]
    return {"roc": {"fpr": np.r_[0.0, fp[keep] / fp[-1]].tolist(), "tpr": np.r_[0.0, tp[keep] / tp[-1]].tolist(),
                    "threshold": np.r_[np.inf, thr].tolist()},
            "pr": {"recall": (tp[keep] / tp[-1]).tolist(), "precision": (tp[keep] / (tp[keep] + fp[keep])).tolist(),
                   "threshold": thr.tolist()}}


def discrimination(obs: Observations) -> dict:
    """AUROC, average precision (with the prevalence baseline it must beat) and FPR at 95% TPR, artifact = positive."""
    out = _discrimination(_Ranked.of(obs.score), obs.positives, obs.negatives)
    out["prevalence"] = {"value": obs.prevalence}
    return out


# -- correlation coefficients -----------------------------------------------------------------------------------------
def rank_correlations(x: np.ndarray, y: np.ndarray, name: str = "") -> dict:
    """Spearman rho and Kendall tau-b between two per-position variables (e.g. score and artifact frequency)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        reason = f"fewer than 3 finite pairs{' of ' + name if name else ''}"
        return {"spearman": undefined(reason), "kendall": undefined(reason)}
    for v, which in ((x, "first"), (y, "second")):
        if np.all(v == v[0]):
            reason = f"the {which} variable{' of ' + name if name else ''} is constant"
            return {"spearman": undefined(reason), "kendall": undefined(reason)}
    rho = sps.spearmanr(x, y)
    tau = sps.kendalltau(x, y)  # tau-b: accounts for the heavy ties of a mostly-zero frequency
    return {"spearman": {"value": float(rho.statistic), **p_value_record(rho.pvalue, x.size)},
            "kendall": {"value": float(tau.statistic), **p_value_record(tau.pvalue, x.size)}}


#: The smallest positive double: a p-value that underflows to 0.0 is below it.
SMALLEST_DOUBLE = float(np.nextafter(0.0, 1.0))


def p_value_record(p: float, n_pairs: int) -> dict:
    """A p-value as the tool writes it: never 0.0. ``p_value`` (None when it underflows), ``p_value_below`` (the
    bound it is known to be under when it underflows: the smallest positive double, else None), ``p_value_text``,
    ``n_pairs`` and what the test assumes (independent pairs: positions of one image are not, so it is descriptive)."""
    p = float(p)
    under = p == 0.0
    return {"p_value": None if under else p, "p_value_below": SMALLEST_DOUBLE if under else None,
            "p_value_text": f"< {SMALLEST_DOUBLE:.2g} (below the smallest representable double)" if under
            else f"{p:.3g}", "n_pairs": int(n_pairs),
            "p_value_assumes": "independent pairs; positions of one image are not independent, so read it as "
                               "descriptive"}


# -- reliability: P(artifact | score bin) -------------------------------------------------------------------------
def wilson_interval(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for ``k`` successes in ``n`` trials (arrays); rows with ``n == 0`` give NaN."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    z = sps.norm.ppf(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (the formula gives 0 and 1 there, up to rounding)
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return lo, hi


def reliability(obs: Observations, n_bins: int = 10, confidence: float = 0.95, n_resamples: int = 1000,
                seed: int = 0) -> list[dict]:
    """Artifact rate per equal-count score bin with source-bootstrap intervals.

    Bins are quantiles of the position scores; positions with equal scores always share a bin, so with heavy ties
    there may be fewer bins than asked. Each row: ``lo, hi`` (score range), ``score_mean``, ``positions``,
    ``events``, ``trials``, ``rate``, ``ci_low``, ``ci_high`` (percentile interval over ``n_resamples`` resamples of
    whole source images, :func:`.clustered.source_bootstrap`; None with one source), ``n_sources`` and
    ``wilson_pooled`` (the Wilson interval that treats every (position, sample) pair as independent: too narrow,
    kept for comparison only).
    """
    from .clustered import source_bootstrap

    edges = np.unique(np.quantile(obs.score, np.linspace(0, 1, n_bins + 1)))
    if edges.size < 2:
        edges = np.array([obs.score[0], obs.score[0]])
    idx = np.clip(np.searchsorted(edges, obs.score, side="right") - 1, 0, edges.size - 2)
    _, src = np.unique(obs.source, return_inverse=True)
    S = int(src.max()) + 1
    rows = []
    for b in range(edges.size - 1):
        m = idx == b
        if not m.any():
            continue
        k, n = obs.events[m].sum(), obs.trials[m].sum()
        lo, hi = wilson_interval(k, n, confidence)
        ks, ns = np.bincount(src[m], obs.events[m], S), np.bincount(src[m], obs.trials[m], S)
        boot = source_bootstrap(lambda w, ks=ks, ns=ns: (w @ ks) / (w @ ns) if w @ ns > 0 else np.nan, S,
                                n_resamples, confidence, seed + b)
        rows.append({"lo": float(obs.score[m].min()), "hi": float(obs.score[m].max()),
                     "score_mean": float(obs.score[m].mean()), "positions": int(m.sum()), "events": float(k),
                     "trials": float(n), "rate": float(k / n), "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
                     "n_sources": int(np.count_nonzero(ns)), "wilson_pooled": [float(lo), float(hi)]})
    return rows


def isotonic_fit(obs: Observations, grid: Optional[np.ndarray] = None) -> dict:
    """Monotone non-decreasing P(artifact | score) (scikit-learn IsotonicRegression, weighted by trials)."""
    from sklearn.isotonic import IsotonicRegression

    grid = np.linspace(obs.score.min(), obs.score.max(), 100) if grid is None else np.asarray(grid, np.float64)
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
    iso.fit(obs.score, obs.rate, sample_weight=obs.trials)
    return {"score": grid.tolist(), "p": iso.predict(grid).tolist()}


def logistic_fit(obs: Observations, grid: Optional[np.ndarray] = None) -> dict:
    """logit P(artifact) = a + b * (score - mean) / sd, fitted by weighted maximum likelihood (scikit-learn).

    ``odds_ratio_per_sd`` is exp(b): how the odds of an artifact multiply per standard deviation of score.
    Undefined when all observations are clean or all are artifacts.
    """
    from sklearn.linear_model import LogisticRegression

    if obs.events.sum() <= 0:
        return undefined(UNDEFINED_NO_POSITIVE)
    if obs.negatives.sum() <= 0:
        return undefined(UNDEFINED_NO_NEGATIVE)
    mu, sd = float(obs.score.mean()), float(obs.score.std()) or 1.0
    s = (obs.score - mu) / sd
    x = np.concatenate([s, s])[:, None]
    y = np.concatenate([np.ones_like(s), np.zeros_like(s)])
    w = np.concatenate([obs.positives, obs.negatives])
    keep = w > 0
    model = LogisticRegression(C=1e6, max_iter=1000).fit(x[keep], y[keep], sample_weight=w[keep])
    a, b = float(model.intercept_[0]), float(model.coef_[0, 0])
    grid = np.linspace(obs.score.min(), obs.score.max(), 100) if grid is None else np.asarray(grid, np.float64)
    p = 1.0 / (1.0 + np.exp(-(a + b * (grid - mu) / sd)))
    return {"value": b, "intercept": a, "slope_per_sd": b, "odds_ratio_per_sd": float(np.exp(b)),
            "score_mean": mu, "score_sd": sd, "score": grid.tolist(), "p": p.tolist()}


def threshold_for_false_alarm(obs: Observations, false_alarm: float = 0.05) -> dict:
    """The lowest score threshold at which at most ``false_alarm`` of the clean observations score >= it.

    Returns the threshold and, at it, the observed false-alarm rate and the fraction of artifact observations caught
    (TPR). Undefined without clean observations.
    """
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    if obs.negatives.sum() <= 0:
        return undefined(UNDEFINED_NO_NEGATIVE)
    ranked = _Ranked.of(obs.score)
    n, p = ranked.sums(obs.negatives), ranked.sums(obs.positives)
    fpr = np.cumsum(n) / n.sum()               # flagged clean fraction when thresholding at each unique score
    ok = np.nonzero(fpr <= false_alarm + 1e-12)[0]
    if ok.size == 0:                           # even the top score alone flags too many clean observations
        thr, fa, tpr = float(np.nextafter(ranked.thresholds[0], np.inf)), 0.0, 0.0
    else:
        i = ok[-1]
        thr, fa = float(ranked.thresholds[i]), float(fpr[i])
        tpr = float(np.cumsum(p)[i] / p.sum()) if p.sum() > 0 else None
    return {"value": thr, "false_alarm_target": false_alarm, "false_alarm": fa, "tpr": tpr,
            "chosen_on": "the same pooled (position, sample) pairs it is judged on (in sample, optimistic); the "
                         "image-level gate of analyses/clustered.py is judged out of sample"}


# -- bootstrap over sources -------------------------------------------------------------------------------------------
def bootstrap_by_source(obs: Observations, statistic: Callable[[np.ndarray], dict], keys: list[str],
                        n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals of ``statistic(weights)`` over resamples of whole source images (every crop and condition
    of one source moves together; :func:`.clustered.source_bootstrap`).

    ``statistic(mult)`` receives a per-position multiplicity (how many times its source was drawn) and returns a
    dict of ``{key: {"value": ...}}``; resamples where a key is undefined are skipped and counted.
    Returns ``{key: {"ci_low", "ci_high", "n_valid", "n_sources"}}``.
    """
    from .clustered import source_bootstrap

    _, src = np.unique(obs.source, return_inverse=True)
    S = int(src.max()) + 1

    def values(m):
        res = statistic(m[src])
        return np.array([np.nan if res[k].get("value") is None else res[k]["value"] for k in keys])
    boot = source_bootstrap(values, S, n_resamples, confidence, seed, keys=keys)
    return {k: {"ci_low": b["ci_low"], "ci_high": b["ci_high"], "n_valid": b["n_valid"], "n_sources": S}
            for k, b in boot.items()}


def correlate(obs: Observations, explosion: Optional[np.ndarray] = None, n_bins: int = 10,
              n_resamples: int = 1000, false_alarm: float = 0.05, confidence: float = 0.95, seed: int = 0) -> dict:
    """Every headline statistic of score vs artifacts, with image-bootstrap intervals. JSON-serialisable.

    Arguments:
        obs: per-position observations.
        explosion: optional per-position explosion-map statistic (e.g. the max inverse log-Jacobian), ``[N]``;
            correlated with the artifact frequency and with the score.
    """
    ranked = _Ranked.of(obs.score)
    disc = discrimination(obs)
    keys = ["auroc", "average_precision", "fpr_at_95_tpr"]
    ci = bootstrap_by_source(obs, lambda m: _discrimination(ranked, obs.positives * m, obs.negatives * m), keys,
                            n_resamples, confidence, seed)
    for k in keys:
        if disc[k].get("value") is not None:
            disc[k].update(ci[k])
    out = {"n_positions": int(obs.score.size), "n_images": int(np.unique(obs.image).size),
           "n_sources": int(np.unique(obs.source).size),
           "n_trials": float(obs.trials.sum()), "n_events": float(obs.events.sum()),
           "confidence": confidence,
           "bootstrap": {"unit": "source image", "n_resamples": n_resamples, "seed": seed,
                         "method": "percentile bootstrap over source images (scipy.stats.bootstrap)"},
           **disc,
           "score_vs_frequency": rank_correlations(obs.score, obs.rate, "score vs artifact frequency"),
           "reliability": reliability(obs, n_bins, confidence, n_resamples, seed),
           "isotonic": isotonic_fit(obs),
           "logistic": logistic_fit(obs),
           "threshold": threshold_for_false_alarm(obs, false_alarm),
           "curves": curves(obs)}
    if explosion is not None:
        explosion = np.asarray(explosion, np.float64).ravel()
        out["explosion_vs_frequency"] = rank_correlations(explosion, obs.rate, "explosion map vs artifact frequency")
        out["score_vs_explosion"] = rank_correlations(obs.score, explosion, "score vs explosion map")
    return out


def per_image_table(obs: Observations) -> list[dict]:
    """One row per image: mean / p99 / max score and artifact fraction (events / (positions x trials))."""
    rows = []
    for img in np.unique(obs.image):
        m = obs.image == img
        s = obs.score[m]
        rows.append({"image": int(img), "score_mean": float(s.mean()), "score_p99": float(np.quantile(s, 0.99)),
                     "score_max": float(s.max()),
                     "artifact_fraction": float(obs.events[m].sum() / obs.trials[m].sum())})
    return rows


def score_histogram_counts(score: np.ndarray, events: np.ndarray, trials: np.ndarray, bins: int = 40) -> dict:
    """Weighted class-conditional histogram counts (``reports.figures.score_histograms`` draws them): ``bins`` bins on
    the pooled score range; ``artifact`` sums ``events``, ``clean`` sums ``trials - events`` per bin."""
    score = np.asarray(score, np.float64)
    edges = np.histogram_bin_edges(score, bins=bins)
    art, _ = np.histogram(score, edges, weights=events)
    clean, _ = np.histogram(score, edges, weights=np.asarray(trials) - np.asarray(events))
    return {"edges": edges.tolist(), "artifact": art.tolist(), "clean": clean.tolist()}
