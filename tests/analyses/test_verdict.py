"""The verdict policy on hand-made condition rows and adversarial summaries: each verdict name, its rule, and the
rates (N, interval, upper bound) on every reason line."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from robustness_diag.analyses.audit.config import FLAG_RATE, SMALL_BUDGET
from robustness_diag.analyses.clustered import rate, zero_event_upper_bound

# the module (the package re-exports its function under the same name)
V = importlib.import_module("robustness_diag.analyses.audit.verdict")

AFFINE = {"bound_log_slope": math.log(1e4)}
SPLINE = {"bound_log_slope": None}


def flags(k_per_image, samples=3):
    """A rate record for images with ``k_per_image`` flagged samples each, image ``i`` from source ``i % 4``."""
    k = np.asarray(k_per_image)
    return rate(k, np.full(k.size, samples), np.arange(k.size) % 4, n_resamples=50, unit="sample")


def cond(name, k_per_image, samples=3, art=None, nonfinite=0.0, slope=2.0):
    rec = flags(k_per_image, samples)
    return {"condition": name, "images": len(k_per_image), "samples": samples, "paper_flag": rec,
            "frac_samples_with_artifact": rec["value"],
            "frac_artifact_pixels": (1e-3 * rec["value"]) if art is None else art,
            "frac_nonfinite_pixels": nonfinite, "max_log_slope": slope}


def attack_row(objective, k_per_image, eps=SMALL_BUDGET, kind="attack", nonfinite=0.0, slope=3.0, samples=3):
    row = cond("x", k_per_image, samples, nonfinite=nonfinite, slope=slope)
    row.pop("condition")
    row.pop("max_log_slope")
    return {**row, "kind": kind, "objective": objective, "epsilon": eps, "steps": 8, "iterates_evaluated": 9,
            "draws": 9, "sampled_max_log_slope": slope, "attack_latents_max_log_slope": slope + 1.5}


def adversarial(slope_k, artifact_k, random_k=(0, 0), unconstrained_k=(0, 0), **kw):
    return {"slope_8_255": attack_row("slope", slope_k, **kw),
            "random_slope_8_255": attack_row("slope", random_k, kind="random"),
            "artifact_8_255": attack_row("artifact", artifact_k, **kw),
            "random_artifact_8_255": attack_row("artifact", random_k, kind="random"),
            "slope_unconstrained": attack_row("slope", unconstrained_k, eps=1.0),
            "artifact_unconstrained": attack_row("artifact", unconstrained_k, eps=1.0)}


def suite(noise=(0, 0, 0, 0), contrast=(0, 0, 0, 0), clean=(0, 0, 0, 0), **kw):
    return [cond("clean", clean), cond("noise3", noise, **kw), cond("exposure3", contrast)]


def test_spline_flagged_83_percent_under_attack_is_out_of_range_artifacts_not_no_artifacts_found():
    # 5 of 6 attacked samples flagged (2 images x 3 samples), finite, no bound: the paper would flag it
    v = V.verdict(SPLINE, suite(noise=(3, 3, 3, 3), contrast=(2, 2, 1, 2)), adversarial((3, 2), (3, 3)))
    assert v["verdict"] == V.OUT_OF_RANGE != V.NONE_FOUND
    assert v["rule"] == V.RULES[V.OUT_OF_RANGE] and f"{FLAG_RATE:.0%}" in v["rule"]
    head = v["reasons"][0]
    assert head.startswith("out-of-range artifacts:") and "83.3% (5 of 6) flagged with the inverse-slope" in head
    assert "100.0% (6 of 6) flagged with the out-of-range objective" in head
    slope_line = next(r for r in v["reasons"] if r.startswith("adversarial LR within 8/255 (inverse-slope"))
    assert "83.3% of samples flagged (5 of 6 from 2 independent sources; 95% CI" in slope_line
    assert "exact binomial" in slope_line and "flag rate above 5%" in slope_line
    assert "on fresh latents" in slope_line and "on the search's own latents" in slope_line
    # every degradation states its rate, with N and interval or upper bound
    noise = next(r for r in v["reasons"] if r.startswith("noise3"))
    assert "100.0% of samples flagged (12 of 12" in noise
    contrast = next(r for r in v["reasons"] if r.startswith("exposure3"))
    assert "58.3% of samples flagged (7 of 12" in contrast
    clean = next(r for r in v["reasons"] if r.startswith("clean"))
    assert "0 of 12 samples flagged (the rate may still be up to" in clean
    # the random baseline of each objective is its own line
    assert sum(r.startswith("random sign noise +-8/255 (best of 9 draws") for r in v["reasons"]) == 2
    json.dumps(v)                                                     # JSON-able as it is


def test_non_finite_output_is_exploding_inverse():
    v = V.verdict(AFFINE, suite(noise=(3, 3, 3, 3), nonfinite=0.3), adversarial((0, 0), (0, 0)))
    assert v["verdict"] == V.EXPLODING
    assert "non-finite output" in v["reasons"][0] and "1 of 7 tests" in v["reasons"][0]
    noise = next(r for r in v["reasons"] if r.startswith("noise3"))
    assert "[exploding inverse: non-finite output; flag rate above 5%]" in noise
    tests = {t["test"]: t for t in v["verdict_tests"]}
    assert tests["noise3"]["explodes"] and not tests["exposure3"]["explodes"]


def test_slope_at_the_coupling_bound_is_exploding_inverse_even_when_finite_and_unflagged():
    at = 0.995 * math.log(1e4)
    v = V.verdict(AFFINE, suite(), adversarial((0, 0), (0, 0), slope=at))
    assert v["verdict"] == V.EXPLODING and "inverse slope at the 1/eps bound" in v["reasons"][0]
    # a small hard bound (HCFlow's atan scale, 1.65) reached is the coupling working as designed
    v = V.verdict({"bound_log_slope": math.log(1.65)}, suite(), adversarial((0, 0), (0, 0), slope=0.5))
    assert v["verdict"] == V.NONE_FOUND
    assert any("bounded by construction at 1.65" in c for c in v["caveats"])


def test_no_artifacts_found_states_the_upper_bound_of_every_rate():
    v = V.verdict(SPLINE, suite(), adversarial((0, 0), (0, 0)))
    assert v["verdict"] == V.NONE_FOUND
    ub12, ub6 = zero_event_upper_bound(12), zero_event_upper_bound(6)
    assert f"may still be up to {ub6:.1%}" in v["reasons"][0]        # the largest per-test bound (fewest samples)
    assert "0 samples flagged" in v["reasons"][0] and "in each of 7 tests (60 samples in all)" in v["reasons"][0]
    for r in v["reasons"][1:]:
        assert "0 of " in r and "may still be up to" in r
    assert f"0 of 12 samples flagged (the rate may still be up to {ub12:.1%}" in next(
        r for r in v["reasons"] if r.startswith("noise3"))
    tests = [t for t in v["verdict_tests"] if t["kind"] != "unconstrained"]
    assert all(t["k"] == 0 and t["upper_bound"] == pytest.approx(zero_event_upper_bound(t["n"])) for t in tests)


def test_rare_artifacts_below_the_stated_rate():
    v = V.verdict(SPLINE, suite(noise=(1,) + (0,) * 23, samples=3), adversarial((0, 0), (0, 0)))
    assert v["verdict"] == V.RARE
    assert "none above 5%" in v["reasons"][0] and "1.4% (1 of 72) flagged" in v["reasons"][0]


def test_flagged_clean_samples_fail_before_anything_else():
    v = V.verdict(AFFINE, suite(clean=(1, 0, 0, 0), noise=(3, 3, 3, 3), nonfinite=0.5),
                  adversarial((3, 3), (3, 3)))
    assert v["verdict"] == V.FAILS_ON_CLEAN
    assert "clean held-out crops, 8.3% of samples flagged (1 of 12" in v["reasons"][0]
    assert "exploding inverse in 1 of 7 tests (non-finite output)" in v["reasons"][0] and v["exploding_inverse"]
    v = V.verdict(SPLINE, suite(clean=(1, 0, 0, 0)), adversarial((0, 0), (0, 0)))
    assert v["verdict"] == V.FAILS_ON_CLEAN and not v["exploding_inverse"]
    assert "no exploding inverse in any test" in v["reasons"][0]


def test_unconstrained_attacks_are_caveats_not_the_verdict():
    v = V.verdict(SPLINE, suite(), adversarial((0, 0), (0, 0), unconstrained_k=(3, 3)))
    assert v["verdict"] == V.NONE_FOUND
    unc = [c for c in v["caveats"] if c.startswith("adversarial LR, budget 1")]
    assert len(unc) == 2 and all("100.0% of samples flagged (6 of 6" in c for c in unc)
    assert any("no hard bound on its inverse slope" in c for c in v["caveats"])


def test_verdict_names_cannot_be_misread_as_the_old_ones():
    assert V.VERDICTS == (V.FAILS_ON_CLEAN, V.EXPLODING, V.OUT_OF_RANGE, V.RARE, V.NONE_FOUND)
    assert not {"robust", "at risk", "failing"} & set(V.VERDICTS)
    assert set(V.RULES) == set(V.VERDICTS)
