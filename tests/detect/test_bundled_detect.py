"""Acceptance on the bundled flows and the model cards' measurement set (held-out crops, documented degradations).

The affine flow's exploding inverse on OOD conditions is found: artifact pixels, inverse slopes at 1/eps and the
exploding layer named for the artifact pixels. The RQ-spline flow's guarantee is additive (``inverse_slope_bound()``:
the inverse moves a value by at most the box width), not a slope bound: its local inverse slope inside the box can
reach ~3e3 (graphics condition). On the measurement set its slopes stay below the level 1/eps = 1e4 at which the
affine flow saturates, and no layer's activation explodes.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import robustness_diag as rd
from robustness_diag.analyses.phenomenon import PhenomenonConfig, conditions
from robustness_diag.data.photos import VALIDATION_PHOTOS, load_photo, random_crops
from robustness_diag.detect import trace_sampling

CARD = PhenomenonConfig(flows=[], images=8, lr_size=16, samples=4)     # the model cards' settings
EXPLODING = ("noise1", "noise2", "noise3", "exposure2")               # NaN pixels in the affine card
SPLINE_SLOPE_LIMIT = 1e4      # the affine bound 1/eps, reached by every exploding affine sample


@functools.lru_cache(maxsize=None)
def _conditions() -> dict:
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], CARD.images, CARD.lr_size * 4,
                      torch.Generator().manual_seed(CARD.seed), augment=False)
    return conditions(hr, 4, CARD)


@functools.lru_cache(maxsize=None)
def _flow(name):
    return rd.load_flow(f"bundled:{name}")


def _check_affine(r):
    """Every sample with NaN pixels saturated an affine sub-transform at 1/eps and has a named first layer; the
    NaN pixels (and nearly all artifact pixels of those samples) carry an attribution."""
    names = rd.detect.layer_names(_flow("sr4x_affine"))
    has_nan = r.nan_mask.flatten(1).any(1)
    if not has_nan.any():
        return
    torch.testing.assert_close(r.max_inverse_slope[has_nan], torch.full_like(r.max_inverse_slope[has_nan], 1e4),
                               rtol=1e-3, atol=0)
    assert (r.first_layer[has_nan] >= 0).all()
    # usually a coupling; the split prior (exp(logs) of a large conditioning half) can be first, too
    assert set(r.first_layer[has_nan].tolist()) <= set(names)
    assert (r.attribution[r.nan_mask] >= 0).float().mean() > 0.99
    art = r.artifact_mask & has_nan[:, None, None]
    assert (r.attribution[art] >= 0).float().mean() > 0.95
    for row, bad in zip(r.rows(), has_nan.tolist()):
        if bad:
            name = row["first_exploding_layer_name"]
            assert name.startswith(names[row["first_exploding_layer"]]), name
            assert ("coupling/" in name) == (" coupling" in names[row["first_exploding_layer"]])


def _check_spline(r):
    assert torch.isfinite(r.image).all() and not r.nan_mask.any()
    assert (r.max_inverse_slope < SPLINE_SLOPE_LIMIT).all()
    assert (r.first_layer == -1).all()
    assert r.settings["bound"]["kind"] == "additive"


def test_affine_explosions_are_found_on_ood_and_absent_on_clean():
    flow, conds = _flow("sr4x_affine"), _conditions()
    clean = trace_sampling(flow, conds["clean"][:4], CARD.heat, 1, torch.Generator().manual_seed(0))
    assert not clean.artifact_mask.any() and (clean.first_layer == -1).all()
    assert (clean.max_inverse_slope < 100).all()
    ood = trace_sampling(flow, conds["noise2"][:4], CARD.heat, 1, torch.Generator().manual_seed(0))
    assert ood.nan_mask.flatten(1).any(1).all() and ood.artifact_fraction.min() > 0.9
    _check_affine(ood)
    assert math.isclose(ood.settings["bound"]["max_inverse_slope"], 1e4)


def test_spline_slopes_stay_bounded_on_ood():
    r = trace_sampling(_flow("sr4x_rqspline"), _conditions()["noise2"][:2], CARD.heat, 1,
                       torch.Generator().manual_seed(0))
    _check_spline(r)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sr4x_affine", "sr4x_rqspline"])
def test_whole_measurement_set(name):
    """Every condition of the model card, 8 crops x 4 samples, generators as ``analyses.phenomenon.measure``."""
    flow = _flow(name)
    for cond, lr in _conditions().items():
        for s in range(CARD.samples):
            r = trace_sampling(flow, lr, CARD.heat, 1, torch.Generator().manual_seed(CARD.seed * 1000 + s),
                               keep_layer_maps=False)
            if name == "sr4x_affine":
                _check_affine(r)
                if cond == "clean" or cond.startswith(("blur", "jpeg")):      # in distribution or mild
                    assert not r.nan_mask.any() and (r.first_layer == -1).all(), cond
                if cond in ("noise1", "noise2", "noise3"):
                    assert r.nan_mask.any(), cond
            else:
                _check_spline(r)
