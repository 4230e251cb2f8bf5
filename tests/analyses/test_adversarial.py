"""Adversarial condition search on the bundled flows (small crops, few steps): both objectives, the best-of-N random
baseline, and the audit's adversarial unit re-sampled with fresh latents."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import robustness_diag as rd
from robustness_diag.analyses.adversarial import OBJECTIVES, AttackConfig, attack, random_search
from robustness_diag.data.photos import VALIDATION_PHOTOS, downscale, load_photo, random_crops
from robustness_diag.flows.bijections import MIN_DERIVATIVE


@pytest.fixture(scope="module")
def lr():
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 2, 48, torch.Generator().manual_seed(0),
                      augment=False)
    return downscale(hr, 4)


@pytest.fixture(scope="module")
def affine():
    return rd.load_flow("bundled:sr4x_affine")


@pytest.fixture(scope="module")
def spline():
    return rd.load_flow("bundled:sr4x_rqspline")


def test_affine_search_reaches_the_inverse_bound_within_a_small_budget(lr, affine):
    before = [p.clone() for p in affine.parameters()]
    req = [p.requires_grad for p in affine.parameters()]
    res = attack(affine, lr, AttackConfig(epsilon=8 / 255, steps=8))
    assert (res.lr - lr).abs().max() <= 8 / 255 + 1e-6 and res.lr.min() >= 0 and res.lr.max() <= 1
    assert torch.all(res.start_log_slope < 3)                       # clean inputs: slopes of a few units
    assert torch.all(res.best_log_slope > math.log(1e4) - 0.05)      # searched: at 1/eps = 1e4
    assert res.evaluated == 9 and len(res.history) == 9
    assert all(torch.equal(a, b) for a, b in zip(before, affine.parameters()))
    assert [p.requires_grad for p in affine.parameters()] == req and not affine.training


def test_spline_slope_is_not_capped_and_its_output_stays_finite(lr, spline):
    res = attack(spline, lr, AttackConfig(epsilon=1.0, steps=4))
    assert torch.all(res.best_log_slope >= res.start_log_slope)
    # no derivative cap bounds the spline's inverse slope: the search passes 1 / MIN_DERIVATIVE (= 1e3)
    assert float(res.best_log_slope.max()) > math.log(1 / MIN_DERIVATIVE)
    x = spline.sample(res.lr, 0.9, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_the_artifact_objective_pushes_spline_samples_out_of_range(lr, spline):
    cfg = AttackConfig(epsilon=8 / 255, steps=4, objective="artifact")
    res = attack(spline, lr, cfg)
    assert (res.lr - lr).abs().max() <= 8 / 255 + 1e-6
    assert torch.all(res.best_objective > 100 * res.start_objective)   # a smooth out-of-range count, up from ~0
    # the found input, on its fixed latents, has pixels outside [-0.5, 1.5]
    g = torch.Generator().manual_seed(cfg.seed)
    x = spline.sample(res.lr, latents=spline.draw_latents(lr, cfg.heat, g))
    assert bool(((x > 1.5) | (x < -0.5)).any())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_best_of_n_random_baseline_uses_the_same_budget_latents_and_objective(lr, affine, objective):
    cfg = AttackConfig(epsilon=8 / 255, steps=4, objective=objective)
    one = random_search(affine, lr, cfg, draws=1)
    best = random_search(affine, lr, cfg, draws=5)
    assert best.evaluated == 5 and len(best.history) == 5
    assert (best.lr - lr).abs().max() <= 8 / 255 + 1e-6 and best.lr.min() >= 0 and best.lr.max() <= 1
    # a sign perturbation: every pixel at +-epsilon unless clamped
    moved = (best.lr - lr).abs()
    assert torch.all(((moved - 8 / 255).abs() < 1e-5) | (best.lr == 0) | (best.lr == 1))
    assert torch.all(best.best_objective >= one.best_objective)     # the first draw is a candidate of both
    assert torch.equal(best.start_objective, attack(affine, lr, AttackConfig(epsilon=8 / 255, steps=0,
                                                                           objective=objective)).start_objective)
    res = attack(affine, lr, cfg)
    assert torch.all(res.best_objective > best.best_objective)      # the search beats as many random draws


def test_unknown_objective_or_draws_are_refused(lr, affine):
    with pytest.raises(ValueError, match="objective"):
        attack(affine, lr[:1], AttackConfig(objective="psnr", steps=1))
    with pytest.raises(ValueError, match="objective"):
        random_search(affine, lr[:1], AttackConfig(objective="psnr"), draws=1)
    with pytest.raises(ValueError, match="draws"):
        random_search(affine, lr[:1], AttackConfig(), draws=0)


def test_audit_unit_reports_both_objectives_on_fresh_latents(lr, spline):
    from robustness_diag.analyses.audit.attack import measure_adversarial

    g = torch.Generator().manual_seed(1)
    scorer = rd.ood.fit_flow(spline, [torch.rand(1, 3, 12, 12, generator=g) for _ in range(3)], calibration_fraction=0)
    out, arrays = measure_adversarial(spline, lr, scorer, 0.9, 2, 2, seed=0, source=np.array([3, 5]),
                                      n_resamples=20)
    assert set(out) == {f"{p}{o}_{b}" for o in OBJECTIVES for p, b in (("", "8_255"), ("", "unconstrained"),
                                                                       ("random_", "8_255"))}
    for label, s in out.items():
        assert s["objective"] in OBJECTIVES and s["kind"] == ("random" if label.startswith("random") else "attack")
        assert s["iterates_evaluated"] == 3                             # steps + 1, and as many random draws
        assert s["fresh_latent_seed"] != s["attack_latent_seed"]
        flag = s["paper_flag"]
        assert flag["unit"] == "sample" and flag["n"] == 4 and flag["n_sources"] == 2 and s["sources"] == 2
        assert flag["value"] == pytest.approx(s["frac_samples_with_artifact"])
        assert (flag["k"] == 0) == ("upper_bound" in flag)
        assert "sampled_max_log_slope" in s and "attack_latents_max_log_slope" in s
    for r in ("random_slope_8_255", "random_artifact_8_255"):
        assert out[r]["draws"] == 3 and out[r]["epsilon"] == pytest.approx(8 / 255)
    panels = {s["example_panel"] for s in out.values()} - {None}
    assert panels == {"budget_8_255", "unconstrained"}
    shown = next(k for k, s in out.items() if s["example_panel"] == "budget_8_255")
    assert shown in ("slope_8_255", "artifact_8_255")
    assert {k.split("/")[1] for k in arrays if k.startswith("budget_8_255/")} == {
        "lr", "sample", "mask", "explosion", "attribution", "score"}
    assert arrays["budget_8_255/sample"].shape == (48, 48, 3)
