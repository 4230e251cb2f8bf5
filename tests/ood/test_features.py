"""Levels, channels, padding of odd sizes, and the fit -> score pipeline on a tiny flow."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.ood import (FeatureExtractor, FeatureOptions, aggregate, available_levels, conditioner_features,
                                 default_level, fit_flow, lr_alignment, parse_channels, receptive_field,
                                 resolve_levels, score_maps, upsample_map)
from tests.ood.helpers import one_thread, tiny_flow  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_flow().double()
    finally:
        torch.set_num_threads(n)


def _images(n, h=16, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h + i, w, dtype=torch.float64, generator=g) for i in range(n)]


def test_conditioner_features_equal_flow_features(flow):
    lr = torch.rand(2, 3, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = flow.features(lr)
        for levels in (["fea_up1"], ["fea_up0", "fea_up2"]):
            got = conditioner_features(flow, lr, levels)
            assert list(got) == levels
            for k in levels:
                assert torch.equal(got[k], ref[k])


def test_levels_default_and_validation(flow):
    assert available_levels(flow) == ["fea_up2", "fea_up1", "fea_up0"]
    assert default_level(flow) == "fea_up1" and resolve_levels(flow, None) == ["fea_up1"]
    assert resolve_levels(flow, ["fea_up0", "fea_up1", "fea_up0"]) == ["fea_up0", "fea_up1"]
    with pytest.raises(ValueError, match="choose from fea_up2, fea_up1, fea_up0"):
        resolve_levels(flow, ["fea_up4"])
    assert lr_alignment(flow, ["fea_up1"]) == 2 and lr_alignment(flow, ["fea_up0"]) == 2
    assert receptive_field(flow, ["fea_up1"]) == 2 + 15 * 2
    assert receptive_field(rd.build_flow(rd.FlowConfig()), ["fea_up1"]) == 2 + 15 * 23   # SRFlow's RRDB


def test_parse_channels():
    assert parse_channels(None, 12) is None and parse_channels("all", 12) is None
    assert parse_channels("0:12", 12) is None
    assert parse_channels("0:3, 8,10:", 12) == [0, 1, 2, 8, 10, 11]
    assert parse_channels([5, 1, 1], 12) == [1, 5]
    with pytest.raises(ValueError, match="out of range"):
        parse_channels("11:14", 12)
    with pytest.raises(ValueError, match="bad channel selection"):
        parse_channels("a:b", 12)


@pytest.mark.parametrize("h,w", [(9, 13), (8, 8), (1, 3)])
def test_odd_sizes_are_padded_and_maps_cropped_back(flow, h, w):
    scorer = fit_flow(flow, _images(2), FeatureOptions(levels=["fea_up2", "fea_up1", "fea_up0"]))
    lr = torch.rand(1, 3, h, w, dtype=torch.float64)
    maps = score_maps(flow, scorer, lr)
    assert maps["fea_up1"].shape == (h, w)
    assert maps["fea_up2"].shape == (2 * h, 2 * w)
    assert maps["fea_up0"].shape == (-(-h // 2), -(-w // 2))
    assert all(torch.isfinite(m).all() for m in maps.values())
    assert upsample_map(maps["fea_up1"], (4 * h, 4 * w)).shape == (4 * h, 4 * w)


def test_in_sample_mean_squared_distance_equals_fit_report(flow):
    """Scoring the fit images reproduces tr(Sigma^-1 S) exactly: fit and score see the same positions."""
    imgs = _images(3)
    opts = FeatureOptions(levels=["fea_up1", "fea_up0"], channels="0:5,7:12")
    scorer = fit_flow(flow, imgs, opts, shrinkage="ledoit_wolf", calibration_fraction=0.0)   # every image fitted
    scorer.compute_dtype = torch.float64
    ex = FeatureExtractor(flow, opts)
    for lv in ("fea_up1", "fea_up0"):
        d2 = torch.cat([ex.distance_maps(im, scorer)[lv].double().flatten() for im in imgs]) ** 2
        rep = scorer.fit_report[lv]
        assert d2.numel() == rep["pixel_count"] and rep["dim"] == 10
        assert float(d2.mean()) == pytest.approx(rep["train_mean_sq_distance"], rel=1e-5)  # maps are float32
    m = scorer.meta
    assert m["checkpoint_digest"] == rd.weights_digest(flow) and m["channels"] == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert m["n_images"] == 3 and m["features"]["levels"] == ["fea_up1", "fea_up0"]
    assert m["pixel_count"]["fea_up1"] == sum(im.shape[1] * im.shape[2] for im in imgs)


def test_aggregates():
    m = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    a = aggregate(m, threshold=2.5)
    assert a["mean"] == pytest.approx(2.0) and a["max"] == 3.0
    assert a["frac_above"] == pytest.approx(0.5)            # 3.0 and the NaN
    assert a["p95"] == pytest.approx(2.9) and a["p99"] == pytest.approx(2.98)
    with pytest.raises(ValueError):
        aggregate(torch.zeros(0), 1.0)
