"""Correlation statistics against hand-computed values and scikit-learn/scipy on small inputs."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from robustness_diag.analyses import stats as S


def obs(score, events, trials=1, image=0):
    return S.Observations(score, events, trials, image)


def test_hand_computed_auroc_ap_fpr95():
    o = obs([1, 2, 3, 4], [0, 1, 0, 1])
    d = S.discrimination(o)
    assert d["auroc"]["value"] == pytest.approx(3 / 4)               # pairs (2>1, 4>1, 4>3) of 4
    assert d["average_precision"]["value"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert d["fpr_at_95_tpr"]["value"] == pytest.approx(0.5)         # TPR reaches 1 at threshold 2: one of two clean
    assert d["prevalence"]["value"] == 0.5


def test_ties_count_one_half():
    assert S.discrimination(obs([1, 1], [1, 0]))["auroc"]["value"] == 0.5
    # one position, 3 of 4 samples artifacts: every positive is tied with every negative
    assert S.discrimination(obs([7.0], [3], 4))["auroc"]["value"] == 0.5


def test_weighted_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    score = np.round(rng.normal(size=300), 1)                        # heavy ties
    trials = rng.integers(1, 5, 300)
    events = rng.binomial(trials, 1 / (1 + np.exp(-2 * score)))
    o = obs(score, events, trials)
    s2 = np.concatenate([score, score])
    y = np.concatenate([np.ones(300), np.zeros(300)])
    w = np.concatenate([events, trials - events]).astype(float)
    d = S.discrimination(o)
    assert d["auroc"]["value"] == pytest.approx(roc_auc_score(y, s2, sample_weight=w), abs=1e-12)
    assert d["average_precision"]["value"] == pytest.approx(average_precision_score(y, s2, sample_weight=w),
                                                            abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s2, sample_weight=w, drop_intermediate=False)
    assert d["fpr_at_95_tpr"]["value"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_metrics_are_invariant_to_monotone_rescaling_of_the_score():
    rng = np.random.default_rng(1)
    score = rng.gamma(2.0, size=200)
    events = rng.binomial(1, np.clip(score / 8, 0, 1))
    a = S.discrimination(obs(score, events))
    b = S.discrimination(obs(np.log(score) * 1e3 + 50, events))
    for k in ("auroc", "average_precision", "fpr_at_95_tpr"):
        assert a[k]["value"] == pytest.approx(b[k]["value"], abs=1e-12)


@pytest.mark.parametrize("events, reason", [(0, S.UNDEFINED_NO_POSITIVE), (2, S.UNDEFINED_NO_NEGATIVE)])
def test_all_clean_and_all_artifact_are_undefined_not_a_number(events, reason):
    o = obs(np.arange(20.0), np.full(20, events), 2, np.arange(20) // 5)
    res = S.correlate(o, explosion=np.arange(20.0), n_resamples=50)
    for k in ("auroc", "average_precision", "fpr_at_95_tpr"):
        assert res[k] == {"value": None, "undefined": reason}
    assert res["score_vs_frequency"]["spearman"]["value"] is None
    assert "constant" in res["score_vs_frequency"]["spearman"]["undefined"]
    assert res["logistic"]["undefined"] == reason
    if events == 2:
        assert res["threshold"]["undefined"] == S.UNDEFINED_NO_NEGATIVE
    else:
        assert res["threshold"]["value"] is not None


def test_wilson_interval_hand_values():
    lo, hi = S.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = S.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


def test_reliability_equal_count_bins():
    score = np.arange(100.0)
    events = (score >= 50).astype(int)
    rows = S.reliability(obs(score, events), n_bins=4)
    assert [r["positions"] for r in rows] == [25, 25, 25, 25]
    assert [r["rate"] for r in rows] == [0, 0, 1, 1]
    # one source image: nothing to resample, so no interval; the pooled Wilson interval is kept, labelled
    assert all(r["ci_low"] is None and r["n_sources"] == 1 for r in rows)
    assert all(r["wilson_pooled"][0] <= r["rate"] <= r["wilson_pooled"][1] for r in rows)
    # ten sources: a source-bootstrap interval that brackets the rate
    many = S.Observations(score, events, 1, np.arange(100) % 10)
    rows = S.reliability(many, n_bins=4, n_resamples=200)
    assert all(r["ci_low"] <= r["rate"] <= r["ci_high"] and r["n_sources"] == 10 for r in rows)
    # all-tied scores: one bin, no crash
    assert len(S.reliability(obs(np.ones(10), np.arange(10) % 2), n_bins=5)) == 1


def test_threshold_for_false_alarm_hand_values():
    score = np.concatenate([np.arange(1.0, 11.0), [20.0, 30.0]])
    events = np.array([0] * 10 + [1, 1])
    t = S.threshold_for_false_alarm(obs(score, events), 0.2)
    assert t["value"] == 9.0 and t["false_alarm"] == pytest.approx(0.2) and t["tpr"] == 1.0
    t = S.threshold_for_false_alarm(obs(score, events), 0.05)   # even one clean flagged is 10% > 5%
    assert t["value"] == 20.0 and t["false_alarm"] == 0.0


def test_rank_correlations_match_scipy_and_flag_constants():
    from scipy import stats as sps
    x = np.array([1, 2, 3, 4, 5, 5.0])
    y = np.array([0, 0, 0.5, 0.5, 1, 0.5])
    r = S.rank_correlations(x, y)
    assert r["spearman"]["value"] == pytest.approx(sps.spearmanr(x, y).statistic)
    assert r["kendall"]["value"] == pytest.approx(sps.kendalltau(x, y).statistic)
    assert S.rank_correlations(x, np.zeros(6))["kendall"]["value"] is None


def test_logistic_fit_recovers_a_known_slope():
    rng = np.random.default_rng(2)
    score = rng.normal(3.0, 2.0, 20000)
    events = rng.binomial(1, 1 / (1 + np.exp(-(-1.0 + 1.5 * (score - 3.0) / 2.0))))
    fit = S.logistic_fit(obs(score, events))
    assert fit["slope_per_sd"] == pytest.approx(1.5, rel=0.06)
    assert fit["intercept"] == pytest.approx(-1.0, abs=0.08)
    iso = S.isotonic_fit(obs(score, events))
    assert np.all(np.diff(iso["p"]) >= 0)


def test_bootstrap_is_over_sources_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    n_img, per = 30, 50
    image = np.repeat(np.arange(n_img), per)
    score = rng.normal(size=n_img * per) + np.repeat(rng.normal(size=n_img), per)
    events = rng.binomial(4, 1 / (1 + np.exp(-(score - 1))))
    res = S.correlate(obs(score, events, 4, image), n_resamples=300, seed=1)
    a = res["auroc"]
    assert a["ci_low"] < a["value"] < a["ci_high"] and a["n_valid"] == 300
    assert res["n_images"] == n_img and res["bootstrap"]["unit"] == "source image" and res["n_sources"] == n_img
    again = S.correlate(obs(score, events, 4, image), n_resamples=300, seed=1)
    assert again["auroc"] == a                                     # seeded: reproducible
    one = S.correlate(obs(score, events, 4, 0), n_resamples=50)    # a single image: nothing to resample
    assert one["auroc"]["ci_low"] is None and one["auroc"]["ci_high"] is None
    # three crops per source photo: the resampling unit is the source, so there are 10 of them, not 30
    by_source = S.correlate(S.Observations(score, events, 4, image, source=image // 3), n_resamples=300, seed=1)
    assert by_source["n_sources"] == 10 and by_source["auroc"]["n_sources"] == 10
    assert by_source["auroc"]["value"] == a["value"]


def test_bad_observations_are_refused_with_reasons():
    with pytest.raises(ValueError, match="events"):
        obs([1, 2], [3, 0], 2)
    with pytest.raises(ValueError, match="NaN"):
        obs([1, np.nan], [0, 0])
    with pytest.raises(ValueError, match="entries"):
        obs([1, 2, 3], [0, 1])


def test_curves_end_at_one_and_match_the_hand_example():
    c = S.curves(obs([1, 2, 3, 4], [0, 1, 0, 1]))
    assert c["roc"]["fpr"] == [0, 0, 0.5, 0.5, 1] and c["roc"]["tpr"] == [0, 0.5, 0.5, 1, 1]
    assert c["pr"]["precision"] == pytest.approx([1, 0.5, 2 / 3, 0.5])
    assert S.curves(obs([1, 2], [0, 0]))["undefined"] == S.UNDEFINED_NO_POSITIVE


def test_p_values_are_never_written_as_zero():
    x = np.arange(5000, dtype=np.float64)
    r = S.rank_correlations(x, x ** 2)                      # a perfect monotone relation: scipy's p underflows
    for k in ("spearman", "kendall"):
        rec = r[k]
        assert rec["value"] == pytest.approx(1.0) and rec["n_pairs"] == 5000
        assert rec["p_value"] is None and rec["p_value_below"] == S.SMALLEST_DOUBLE > 0
        assert rec["p_value_text"].startswith("< ")
    weak = S.rank_correlations(np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 5]))["spearman"]
    assert 0 < weak["p_value"] < 1 and weak["p_value_below"] is None
    assert weak["p_value_text"] == f"{weak['p_value']:.3g}"
