"""Statistics whose unit is the independent source image: exact binomial bounds, the source bootstrap, discrimination
at three granularities and an image-level gate judged out of sample.

Why a source: the crops and degraded copies of one photo are not independent observations (and the positions of
one crop even less so), so every interval here resamples whole sources - all crops and conditions of one photo move
together - and every record says how many sources it rests on (``n_sources``). A synthetic graphics image is its own
source.

Inputs:

* per-position :class:`.stats.Observations` with ``source`` and ``condition`` per position (see
  :func:`.stats.Observations`), for the *within condition* and *within image* questions;
* an :class:`ImageTable` (one row per input image: its source, condition, aggregate OOD score, samples drawn and
  samples flagged by the paper's per-image criterion, artifact fraction) for the *image level* question and the gate.

Intervals: percentile intervals of ``n_resamples`` resamples of the sources, drawn by :func:`scipy.stats.bootstrap`
(``method="percentile"``); a resample where the statistic is undefined (one class absent) is skipped and counted
(``n_valid``). Rates also carry the exact Clopper-Pearson interval that treats their units as independent (labelled
so) and, when nothing happened, the one-sided upper bound of the rate.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy import stats as sps

from .stats import Observations, undefined

#: default number of source resamples
N_RESAMPLES = 1000
BOOTSTRAP_METHOD = ("percentile bootstrap over source images (scipy.stats.bootstrap), resamples with an undefined "
                    "statistic skipped")


# -- binomial bounds ------------------------------------------------------------------------------------------------
def clopper_pearson(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval of a binomial rate ``k / n`` (``n >= 1``).

    >>> [round(v, 4) for v in clopper_pearson(0, 12)]
    [0.0, 0.2646]
    """
    k, n = int(round(k)), int(round(n))
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(sps.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def zero_event_upper_bound(n: float, confidence: float = 0.95) -> float:
    """One-sided exact upper bound of a rate with no event in ``n`` independent trials: ``1 - (1 - confidence)^(1/n)``
    (about ``3 / n`` at 95%, the rule of three).

    >>> round(zero_event_upper_bound(12), 3)
    0.221
    """
    n = int(round(n))
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return float(1 - (1 - confidence) ** (1 / n))


# -- the source bootstrap -------------------------------------------------------------------------------------------
def source_bootstrap(statistic: Callable[[np.ndarray], object], n_sources: int, n_resamples: int = N_RESAMPLES,
                     confidence: float = 0.95, seed: int = 0, keys: Optional[list] = None):
    """Percentile interval of ``statistic(mult)`` over resamples of ``n_sources`` sources.

    ``statistic`` receives the multiplicity of every source in the resample (``[n_sources]`` float, summing to
    ``n_sources``) and returns a float, NaN when undefined on that resample, or, with ``keys``, one float per key.
    Returns ``{"ci_low", "ci_high", "n_sources", "n_resamples", "n_valid", "method", "confidence"}`` (with ``keys``:
    ``{key: that dict}``); the bounds are None with fewer than two sources or when under 10% of the resamples are
    defined (``"no_interval"`` says why).
    """
    rec = {"ci_low": None, "ci_high": None, "n_sources": int(n_sources), "n_resamples": int(n_resamples),
           "n_valid": 0, "method": BOOTSTRAP_METHOD, "confidence": confidence}
    names = [None] if keys is None else list(keys)
    if n_sources < 2:
        one = {**rec, "no_interval": f"{n_sources} source image(s): nothing to resample"}
        return one if keys is None else {k: dict(one) for k in names}

    def stat(idx):
        return statistic(np.bincount(np.asarray(idx, np.int64), minlength=n_sources).astype(np.float64))

    with np.errstate(all="ignore"), warnings.catch_warnings():
        # degenerate resamples are expected (e.g. a rate of 0 everywhere); the interval is read from the distribution
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap((np.arange(n_sources),), stat, n_resamples=n_resamples, vectorized=False,
                            method="percentile", confidence_level=confidence, rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, np.float64).reshape(len(names), -1)
    a = (1 - confidence) / 2
    out = {}
    for k, d in zip(names, dist):
        d = d[np.isfinite(d)]
        if d.size < max(10, n_resamples // 10):
            out[k] = {**rec, "n_valid": int(d.size),
                      "no_interval": f"the statistic is defined in only {d.size} of {n_resamples} resamples"}
        else:
            lo, hi = np.quantile(d, [a, 1 - a])
            out[k] = {**rec, "n_valid": int(d.size), "ci_low": float(lo), "ci_high": float(hi)}
    return out[None] if keys is None else out


def _source_index(source) -> tuple[np.ndarray, int]:
    """Dense ``0..S-1`` indices of the given source ids and ``S``."""
    uniq, inv = np.unique(np.asarray(source), return_inverse=True)
    return inv.ravel(), int(uniq.size)


def rate(flags_k, flags_n, source, n_resamples: int = N_RESAMPLES, confidence: float = 0.95, seed: int = 0,
         unit: str = "sample") -> dict:
    """A rate over units grouped in sources: ``sum(k) / sum(n)`` where unit ``i`` (an image) has ``k[i]`` events in
    ``n[i]`` trials (its samples) and comes from ``source[i]``.

    Returns ``{"value", "k", "n", "unit", "n_sources", "ci_low", "ci_high", "interval", "exact_ci",
    "exact_assumes"}`` plus ``"upper_bound"`` (one-sided, exact) when ``k == 0``. The interval is the source
    bootstrap, except at a rate of 0 or 1, where every resample repeats it and the exact interval is given instead
    (``interval["method"]`` says which); ``exact_ci`` is Clopper-Pearson treating the ``n`` trials as independent
    (they are not when they share a source, so the bootstrap interval is the one to read).
    """
    k, n = np.asarray(flags_k, np.float64).ravel(), np.asarray(flags_n, np.float64).ravel()
    sidx, S = _source_index(source)
    K, N = float(k.sum()), float(n.sum())
    if N <= 0:
        return {**undefined(f"no {unit}s"), "k": 0, "n": 0, "unit": unit, "n_sources": S}
    ks, ns = np.bincount(sidx, k, S), np.bincount(sidx, n, S)
    boot = source_bootstrap(lambda m: (m @ ks) / (m @ ns) if m @ ns > 0 else np.nan, S, n_resamples, confidence,
                            seed)
    lo, hi = clopper_pearson(K, N, confidence)
    rec = {"value": K / N, "k": int(K), "n": int(N), "unit": unit, "n_sources": S, "ci_low": boot["ci_low"],
           "ci_high": boot["ci_high"], "interval": boot, "exact_ci": [lo, hi],
           "exact_assumes": f"independent {unit}s (Clopper-Pearson)"}
    if K in (0, N):
        # every resample repeats a rate of 0 (or 1): the bootstrap cannot leave the boundary, so the interval shown
        # is the exact one (which treats the units as independent, hence is still optimistic for clustered data)
        rec.update(ci_low=lo, ci_high=hi, interval={**boot, "ci_low": lo, "ci_high": hi, "method":
                   f"exact Clopper-Pearson over {int(N)} {unit}s (a rate of {K / N:g}: the source bootstrap "
                   f"cannot leave the boundary)"})
    if K == 0:
        rec["upper_bound"] = zero_event_upper_bound(N, confidence)
        rec["upper_bound_text"] = (f"0 of {int(N)} {unit}s: the rate may still be up to {rec['upper_bound']:.1%} "
                                   f"(one-sided {confidence:.0%}, exact)")
    return rec


# -- pairwise concordance, optionally within strata ------------------------------------------------------------------
def _concordance(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """``(concordant, pairs)``: sum over (positive, negative) pairs of [pos score > neg score] + 1/2 [tie], and the
    number of pairs, with per-position positive/negative weights."""
    uniq, inv = np.unique(-score, return_inverse=True)
    p, n = np.bincount(inv.ravel(), pos, uniq.size), np.bincount(inv.ravel(), neg, uniq.size)
    P, N = p.sum(), n.sum()
    if P <= 0 or N <= 0:
        return 0.0, 0.0
    neg_below = N - np.cumsum(n)
    return float(np.sum(p * (neg_below + 0.5 * n))), float(P * N)


def _stratified_auroc(score, pos, neg, strata) -> tuple[float, list]:
    """Pairs are only formed inside a stratum: ``sum_s C_s / sum_s D_s``; also the per-stratum AUROCs (NaN where a
    stratum lacks a class)."""
    C = D = 0.0
    per = []
    for s in np.unique(strata):
        m = strata == s
        c, d = _concordance(score[m], pos[m], neg[m])
        C, D = C + c, D + d
        per.append(c / d if d > 0 else np.nan)
    return (C / D if D > 0 else np.nan), per


def _auroc_record(value: float, boot: dict, **extra) -> dict:
    if not np.isfinite(value):
        return {**undefined("no stratum has both artifact and clean observations"), **extra}
    return {"value": float(value), "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "interval": boot, **extra}


WITHIN_CONDITION_QUESTION = ("Within one stress condition, do positions that break score higher than positions that "
                             "do not? Pairs are formed only inside a condition, so telling conditions apart earns "
                             "nothing.")
WITHIN_IMAGE_QUESTION = ("Inside one image that has both, does the map point at the positions that break? Pairs are "
                         "formed only inside an image (localisation).")
IMAGE_LEVEL_QUESTION = ("Does an image's OOD score tell which inputs will produce artifacts? One aggregate score per "
                        "input image against whether any of its samples has an artifact (the unit a gate acts on).")


def within_condition(obs: Observations, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Position-level AUROC per condition and the stratified average over conditions (pairs only within a
    condition), each with a source-bootstrap interval. ``obs`` needs ``condition`` and ``source``."""
    if obs.condition is None:
        raise ValueError("within_condition needs the condition of every position")
    sidx, S = _source_index(obs.source)
    cond = obs.condition
    value, _ = _stratified_auroc(obs.score, obs.positives, obs.negatives, cond)

    def stat(m):
        w = m[sidx]
        return _stratified_auroc(obs.score, obs.positives * w, obs.negatives * w, cond)[0]

    rows = []
    for i, c in enumerate(dict.fromkeys(cond.tolist())):
        msk = cond == c
        ci_src, cS = _source_index(obs.source[msk])
        sc, po, ne = obs.score[msk], obs.positives[msk], obs.negatives[msk]
        cc, dd = _concordance(sc, po, ne)
        base = {"condition": c, "n_positions": int(msk.sum()), "n_images": int(np.unique(obs.image[msk]).size),
                "n_sources": cS, "n_events": float(po.sum()), "n_trials": float((po + ne).sum())}
        if dd <= 0:
            rows.append({**base, **undefined("one class absent in this condition")})
            continue

        def cstat(m, ci_src=ci_src, sc=sc, po=po, ne=ne):
            c2, d2 = _concordance(sc, po * m[ci_src], ne * m[ci_src])
            return c2 / d2 if d2 > 0 else np.nan
        rows.append({**base, **_auroc_record(cc / dd, source_bootstrap(cstat, cS, n_resamples, confidence,
                                                                       seed + 1 + i))})
    used = [r["condition"] for r in rows if r.get("value") is not None]
    return {"question": WITHIN_CONDITION_QUESTION, "unit": "source image", "n_sources": S,
            "stratified_auroc": _auroc_record(value, source_bootstrap(stat, S, n_resamples, confidence, seed),
                                              conditions_used=used, n_conditions_used=len(used)),
            "per_condition": rows}


def within_image(obs: Observations, n_resamples: int = N_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict:
    """Position-level AUROC with pairs only inside an image, over the images that have both artifact and clean
    observations, with a source-bootstrap interval; plus the spread of the per-image AUROCs."""
    sidx, S = _source_index(obs.source)
    images = np.unique(obs.image)
    parts = []
    for img in images:
        m = obs.image == img
        c, d = _concordance(obs.score[m], obs.positives[m], obs.negatives[m])
        if d > 0:
            parts.append((int(sidx[np.nonzero(m)[0][0]]), c, d))
    if not parts:
        return {"question": WITHIN_IMAGE_QUESTION, "unit": "source image", "n_sources": S, "n_images_used": 0,
                "auroc": undefined("no image has both artifact and clean positions")}
    src = np.array([p[0] for p in parts])
    c = np.array([p[1] for p in parts])
    d = np.array([p[2] for p in parts])
    per = c / d
    used_sources = np.unique(src)
    remap = np.searchsorted(used_sources, src)
    boot = source_bootstrap(lambda m: (m[remap] @ c) / (m[remap] @ d), used_sources.size, n_resamples, confidence,
                            seed)
    return {"question": WITHIN_IMAGE_QUESTION, "unit": "source image", "n_sources": int(used_sources.size),
            "n_images_used": int(len(parts)), "n_images": int(images.size),
            "auroc": _auroc_record(float(c.sum() / d.sum()), boot),
            "per_image_auroc": {"median": float(np.median(per)), "min": float(per.min()), "max": float(per.max())}}


# -- image level ---------------------------------------------------------------------------------------------------
@dataclass
class ImageTable:
    """One row per input image (arrays of one length ``M``): ``source`` (int id of the independent source photo),
    ``condition`` (str), ``score`` (the image's aggregate OOD score), ``samples`` (samples drawn), ``flagged``
    (samples with an artifact by the paper's per-image criterion: any pixel > 1.5, < -0.5 or non-finite),
    ``artifact_fraction`` (artifact pixels / pixels over its samples, in [0, 1]). ``name`` optional."""

    source: np.ndarray
    condition: np.ndarray
    score: np.ndarray
    samples: np.ndarray
    flagged: np.ndarray
    artifact_fraction: np.ndarray
    name: Optional[list] = None

    def __post_init__(self):
        self.score = np.asarray(self.score, np.float64).ravel()
        m = self.score.size
        for f in ("source", "condition", "samples", "flagged", "artifact_fraction"):
            a = np.asarray(getattr(self, f)).ravel()
            if a.size != m:
                raise ValueError(f"{f} has {a.size} entries, score has {m}")
            setattr(self, f, a)
        self.samples = self.samples.astype(np.float64)
        self.flagged = self.flagged.astype(np.float64)
        self.artifact_fraction = self.artifact_fraction.astype(np.float64)
        if not np.all(np.isfinite(self.score)):
            raise ValueError("image scores contain NaN or inf")
        if np.any(self.flagged < 0) or np.any(self.flagged > self.samples):
            raise ValueError("need 0 <= flagged <= samples for every image")

    @property
    def positive(self) -> np.ndarray:
        """``[M]`` bool: the image produced an artifact in at least one sample."""
        return self.flagged > 0

    def subset(self, mask) -> "ImageTable":
        mask = np.asarray(mask, bool)
        return ImageTable(self.source[mask], self.condition[mask], self.score[mask], self.samples[mask],
                          self.flagged[mask], self.artifact_fraction[mask],
                          None if self.name is None else [n for n, k in zip(self.name, mask) if k])


def image_level(t: ImageTable, n_resamples: int = N_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict:
    """The headline: AUROC of the image score against "any artifact" and Spearman rho of the image score against the
    artifact fraction, each with a source-bootstrap interval, N images and N sources."""
    sidx, S = _source_index(t.source)
    pos = t.positive.astype(np.float64)
    neg = 1 - pos
    c, d = _concordance(t.score, pos, neg)

    def auc(m):
        w = m[sidx]
        c2, d2 = _concordance(t.score, pos * w, neg * w)
        return c2 / d2 if d2 > 0 else np.nan

    base = {"question": IMAGE_LEVEL_QUESTION, "unit": "source image", "n_images": int(t.score.size),
            "n_sources": S, "n_positive_images": int(pos.sum()), "n_negative_images": int(neg.sum())}
    auroc = (_auroc_record(c / d, source_bootstrap(auc, S, n_resamples, confidence, seed)) if d > 0 else
             undefined("every image is on one side (all with artifacts or all without)"))

    def rho(m):
        keep = np.repeat(np.arange(t.score.size), m[sidx].astype(int))
        x, y = t.score[keep], t.artifact_fraction[keep]
        if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
            return np.nan
        return float(sps.spearmanr(x, y).statistic)

    full = rho(np.ones(S))
    spearman = (undefined("constant score or artifact fraction, or fewer than 3 images") if not np.isfinite(full)
                else _auroc_record(full, source_bootstrap(rho, S, n_resamples, confidence, seed + 1)))
    return {**base, "auroc": auroc, "spearman_vs_artifact_fraction": spearman}


# -- the gate ------------------------------------------------------------------------------------------------------
def split_sources(source, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the distinct sources: ``(choose, judge)`` arrays of source ids. Every crop and condition
    of one source lands on the same side. Sources are taken from the most images to the fewest (ties in an order
    shuffled with ``seed``), each to the half with fewer images so far, so the halves hold similar image counts."""
    uniq, counts = np.unique(np.asarray(source), return_counts=True)
    order = np.random.default_rng(seed).permutation(uniq.size)
    order = order[np.argsort(-counts[order], kind="stable")]
    halves, sizes = ([], []), [0, 0]
    for i in order:
        side = 0 if sizes[0] < sizes[1] or (sizes[0] == sizes[1] and len(halves[0]) <= len(halves[1])) else 1
        halves[side].append(uniq[i])
        sizes[side] += counts[i]
    return np.sort(np.array(halves[0], dtype=uniq.dtype)), np.sort(np.array(halves[1], dtype=uniq.dtype))


def choose_threshold(score: np.ndarray, negative: np.ndarray, false_alarm: float) -> float:
    """The lowest threshold at which at most ``false_alarm`` of the negative images score ``>=`` it (an image is
    gated when its score is ``>=`` the threshold). Above every score when no negatives exist."""
    s = np.sort(np.asarray(score, np.float64)[np.asarray(negative, bool)])[::-1]
    if s.size == 0:
        return float("inf")
    allowed = int(np.floor(false_alarm * s.size + 1e-9))  # negatives that may be gated
    if allowed == 0:
        return float(np.nextafter(s[0], np.inf))
    v = s[allowed - 1]
    # thresholding at v gates every negative scoring >= v: ties with v beyond the allowance push it just above v
    return float(v) if allowed >= s.size or s[allowed] < v else float(np.nextafter(v, np.inf))


def _gate_rates(t: ImageTable, thr: float, n_resamples, confidence, seed, clean_condition: str) -> dict:
    gated = (t.score >= thr).astype(np.float64)
    pos = t.positive
    groups = {"catch_rate": pos, "false_alarm": ~pos}
    if clean_condition is not None:
        groups.update(false_alarm_clean=~pos & (t.condition == clean_condition),
                      false_alarm_degraded=~pos & (t.condition != clean_condition))
    out = {}
    for i, (k, m) in enumerate(groups.items()):
        out[k] = (rate(gated[m], np.ones(int(m.sum())), t.source[m], n_resamples, confidence, seed + i, unit="image")
                  if m.any() else undefined("no such image"))
    return out


def heldout_gate(t: ImageTable, false_alarm: float = 0.05, n_resamples: int = N_RESAMPLES,
                 confidence: float = 0.95, seed: int = 0, clean_condition: Optional[str] = "clean") -> dict:
    """An image-level gate chosen on one half of the sources and judged on the other.

    The threshold is :func:`choose_threshold` on the artifact-free images of the *choose* half; catch rate (artifact
    images gated) and false-alarm rates (artifact-free images gated: all, and, unless ``clean_condition`` is None,
    the clean ones and the degraded ones separately) are reported
    on the *judge* half with source-bootstrap intervals and, for zero counts, exact upper bounds; the same rates on
    the choose half are given as ``in_sample`` (optimistic by construction).
    """
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    choose, judge = split_sources(t.source, seed)
    a, b = t.subset(np.isin(t.source, choose)), t.subset(np.isin(t.source, judge))
    base = {"unit": "image", "false_alarm_target": false_alarm, "n_sources_choose": int(choose.size),
            "n_sources_judge": int(judge.size), "n_images_choose": int(a.score.size),
            "n_images_judge": int(b.score.size), "split": f"sources split in two halves with seed {seed}"}
    if judge.size == 0 or (~a.positive).sum() == 0:
        return {**base, **undefined("too few sources or no artifact-free image to choose a threshold on")}
    thr = choose_threshold(a.score, ~a.positive, false_alarm)
    return {**base, "value": thr, "heldout": _gate_rates(b, thr, n_resamples, confidence, seed, clean_condition),
            "in_sample": _gate_rates(a, thr, n_resamples, confidence, seed, clean_condition)}


def rate_cell(r: Optional[dict]) -> str:
    """A :func:`rate` record as a table cell: ``"14/24 [0.31, 0.81]"`` (the source-bootstrap interval, or the exact
    one when there is none), with the upper bound for zero events: ``"0/24 [0.00, 0.14] (<= 0.12)"``."""
    if not r or r.get("value") is None:
        return "n/a"
    lo, hi = (r["ci_low"], r["ci_high"]) if r.get("ci_low") is not None else r.get("exact_ci", (None, None))
    ci = "" if lo is None else f" [{float(lo):.2f}, {float(hi):.2f}]"
    ub = "" if r.get("upper_bound") is None else f" (<= {float(r['upper_bound']):.2f})"
    return f"{r['k']}/{r['n']}{ci}{ub}"


__all__ = ["N_RESAMPLES", "clopper_pearson", "zero_event_upper_bound", "source_bootstrap", "rate", "within_condition",
           "within_image", "ImageTable", "image_level", "split_sources", "choose_threshold", "heldout_gate",
           "rate_cell"]
