"""Adversarial condition search on the bundled flows (small crops, few steps)."""
from __future__ import annotations

import math

import pytest
import torch

import robustness_diag as rd
from robustness_diag.analyses.adversarial import AttackConfig, attack
from robustness_diag.data.photos import VALIDATION_PHOTOS, downscale, load_photo, random_crops


@pytest.fixture(scope="module")
def lr():
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 2, 48, torch.Generator().manual_seed(0),
                      augment=False)
    return downscale(hr, 4)


def test_affine_search_reaches_the_inverse_bound_within_a_small_budget(lr):
    flow = rd.load_flow("bundled:sr4x_affine")
    before = [p.clone() for p in flow.parameters()]
    res = attack(flow, lr, AttackConfig(epsilon=8 / 255, steps=8))
    assert (res.lr - lr).abs().max() <= 8 / 255 + 1e-6 and res.lr.min() >= 0 and res.lr.max() <= 1
    assert torch.all(res.start_log_slope < 3)                       # clean inputs: slopes of a few units
    assert torch.all(res.best_log_slope > math.log(1e4) - 0.05)      # searched: at 1/eps = 1e4
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters()))


def test_spline_search_stays_finite(lr):
    flow = rd.load_flow("bundled:sr4x_rqspline")
    res = attack(flow, lr, AttackConfig(epsilon=1.0, steps=4))
    assert torch.all(res.best_log_slope >= res.start_log_slope)
    x = flow.sample(res.lr, 0.9, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_unknown_objective_is_refused(lr):
    with pytest.raises(ValueError, match="objective"):
        attack(rd.load_flow("bundled:sr4x_affine"), lr[:1], AttackConfig(objective="psnr", steps=1))
