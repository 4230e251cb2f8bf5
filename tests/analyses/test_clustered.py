"""Known-answer tests of the source-level statistics (analyses/clustered.py)."""
import numpy as np
import pytest
from scipy import stats as sps

from robustness_diag.analyses import clustered as K
from robustness_diag.analyses import stats as S


def test_clopper_pearson_and_zero_event_bound_hand_values():
    assert K.clopper_pearson(0, 12) == (0.0, pytest.approx(0.26465, abs=1e-4))
    lo, hi = K.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    assert K.clopper_pearson(10, 10)[1] == 1.0
    # one-sided: 1 - 0.05^(1/n); the rule of three is its large-n approximation
    assert K.zero_event_upper_bound(12) == pytest.approx(1 - 0.05 ** (1 / 12))
    assert K.zero_event_upper_bound(1000) == pytest.approx(3 / 1000, rel=0.01)
    with pytest.raises(ValueError):
        K.clopper_pearson(3, 2)


def test_no_events_gives_an_upper_bound_not_a_zero_rate_claim():
    k, n = np.zeros(12), np.ones(12)
    r = K.rate(k, n, source=np.arange(12), n_resamples=200)
    assert r["value"] == 0.0 and r["k"] == 0 and r["n"] == 12 and r["n_sources"] == 12
    assert r["upper_bound"] == pytest.approx(0.2209, abs=1e-3)
    assert "up to 22.1%" in r["upper_bound_text"]
    # the bootstrap cannot leave a rate of 0: the interval shown is the exact one, named
    assert (r["ci_low"], r["ci_high"]) == (0.0, pytest.approx(0.26465, abs=1e-4))
    assert "Clopper-Pearson" in r["interval"]["method"]
    # the p-values the tool writes are never 0.0, even when they underflow
    x = np.arange(2000.0)
    rec = S.rank_correlations(x, x + 1e-3 * np.sin(x))
    assert rec["spearman"]["p_value"] is None and rec["spearman"]["p_value_below"] > 0


def test_the_source_moves_its_crops_together():
    """Five identical crops per source: the interval is that of 10 sources, wider than 50 independent images."""
    rng = np.random.default_rng(0)
    per_source = rng.binomial(1, 0.3, 10).astype(float)
    k = np.repeat(per_source, 5)
    src = np.repeat(np.arange(10), 5)
    clustered = K.rate(k, np.ones(50), src, n_resamples=2000, seed=1)
    naive = K.rate(k, np.ones(50), np.arange(50), n_resamples=2000, seed=1)
    assert clustered["n_sources"] == 10 and naive["n_sources"] == 50
    assert clustered["value"] == naive["value"]
    width = clustered["ci_high"] - clustered["ci_low"]
    assert width > 1.5 * (naive["ci_high"] - naive["ci_low"])
    assert "source" in clustered["interval"]["method"]


def test_pooled_auroc_high_but_every_condition_at_one_half():
    """Two conditions with different artifact rates and score ranges, no score signal inside either."""
    n = 100
    score = np.r_[np.arange(n), 100 + np.arange(n)].astype(float)
    events = np.r_[np.full(n, 1), np.full(n, 9)]
    image = np.r_[np.arange(n) // 10, 10 + np.arange(n) // 10]
    cond = np.array(["mild"] * n + ["harsh"] * n)
    obs = S.Observations(score, events, 10, image, source=image % 10, condition=cond)
    pooled = S.discrimination(obs)["auroc"]["value"]
    assert pooled > 0.85
    w = K.within_condition(obs, n_resamples=200)
    assert w["stratified_auroc"]["value"] == pytest.approx(0.5)
    assert [r["value"] for r in w["per_condition"]] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert w["n_sources"] == 10 and w["per_condition"][0]["n_images"] == 10
    assert w["stratified_auroc"]["ci_low"] <= 0.5 <= w["stratified_auroc"]["ci_high"]


def test_within_image_localisation_is_perfect_when_the_map_points_at_the_artifacts():
    rng = np.random.default_rng(1)
    image = np.repeat(np.arange(8), 20)
    offset = np.repeat(rng.normal(0, 10, 8), 20)              # images differ wildly in level
    hot = np.tile(np.r_[np.ones(3), np.zeros(17)], 8)
    score = offset + hot * 1.0 + rng.uniform(0, 0.5, 160)      # inside an image the hot positions score highest
    obs = S.Observations(score, hot * 2, 2, image)
    w = K.within_image(obs, n_resamples=200)
    assert w["auroc"]["value"] == 1.0 and w["n_images_used"] == 8
    assert w["per_image_auroc"]["min"] == 1.0
    assert S.discrimination(obs)["auroc"]["value"] < 0.9        # pooled across images it is blurred by the offsets


def test_image_level_auroc_and_spearman_against_sklearn_and_scipy():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    m = 60
    score = rng.normal(size=m)
    flagged = rng.binomial(4, 1 / (1 + np.exp(-2 * score)))
    frac = flagged / 4 * rng.uniform(0.01, 0.05, m)
    t = K.ImageTable(np.arange(m) // 3, np.array(["c"] * m), score, np.full(m, 4), flagged, frac)
    r = K.image_level(t, n_resamples=300)
    assert r["auroc"]["value"] == pytest.approx(roc_auc_score(flagged > 0, score))
    assert r["spearman_vs_artifact_fraction"]["value"] == pytest.approx(sps.spearmanr(score, frac).statistic)
    assert r["n_images"] == 60 and r["n_sources"] == 20 and r["unit"] == "source image"
    assert r["auroc"]["ci_low"] <= r["auroc"]["value"] <= r["auroc"]["ci_high"]
    assert r["question"].startswith("Does an image's OOD score")


def test_choose_threshold_hand_values():
    neg = np.ones(20, bool)
    s = np.arange(20.0)
    assert K.choose_threshold(s, neg, 0.05) == 19.0           # one of 20 may be gated: the top one
    assert K.choose_threshold(s, neg, 0.01) == np.nextafter(19.0, np.inf)   # none may be gated
    tied = np.r_[np.arange(18.0), 19.0, 19.0]
    assert K.choose_threshold(tied, neg, 0.05) == np.nextafter(19.0, np.inf)  # gating 19 would gate two


def test_a_threshold_chosen_in_sample_looks_better_than_it_holds_out():
    """No signal, and the choose half's artifact-free images happen to score low: in sample the gate raises no
    false alarm, held out it gates every artifact-free image."""
    src = np.repeat(np.arange(10), 4)
    choose, judge = K.split_sources(src, seed=0)
    assert set(choose).isdisjoint(judge) and set(choose) | set(judge) == set(range(10))
    in_choose = np.isin(src, choose)
    rng = np.random.default_rng(0)
    positive = rng.random(40) < 0.5
    score = np.where(in_choose & ~positive, rng.uniform(0, 1, 40), rng.uniform(2, 3, 40))
    cond = np.where(np.arange(40) % 2 == 0, "clean", "noise1")
    t = K.ImageTable(src, cond, score, np.full(40, 3), positive * 2, positive * 0.01)
    g = K.heldout_gate(t, 0.05, n_resamples=200, seed=0)
    assert g["in_sample"]["false_alarm"]["value"] == 0.0 and g["in_sample"]["false_alarm"]["upper_bound"] > 0
    assert g["heldout"]["false_alarm"]["value"] == 1.0
    assert g["heldout"]["catch_rate"]["value"] == 1.0
    assert g["n_sources_choose"] + g["n_sources_judge"] == 10 and g["unit"] == "image"
    fa_clean, fa_deg = g["heldout"]["false_alarm_clean"], g["heldout"]["false_alarm_degraded"]
    assert fa_clean["n"] + fa_deg["n"] == g["heldout"]["false_alarm"]["n"]
