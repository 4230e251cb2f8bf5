"""Tiling is exact on a bundled flow: its receptive field (62 LR px) is enough, a smaller margin is not."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.ood import FeatureExtractor, FeatureOptions
from tests.ood.helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def test_stitched_maps_equal_untiled_maps_on_a_bundled_flow():
    flow = rd.load_flow("bundled:sr4x_affine")
    g = torch.Generator().manual_seed(0)
    scorer = rd.ood.fit_flow(flow, [torch.rand(1, 3, 24, 24, generator=g) for _ in range(4)],
                             calibration_fraction=0.0)
    lr = torch.rand(1, 3, 40, 160, generator=g)     # wider than tile + 2 x receptive field: windows [0, 102),
    whole = FeatureExtractor(flow, FeatureOptions(tile=1024)).distance_maps(lr, scorer)["fea_up1"]   # [0, 142),
    ex = FeatureExtractor(flow, FeatureOptions(tile=40, whole_max_pixels=0))  # [18, 160), [58, 160): cut at 62 px
    assert ex.margin == ex.rf == 62 and ex.exact and ex.n_tiles(40, 160) == 4
    assert FeatureExtractor(flow, FeatureOptions(tile=40)).n_tiles(40, 160) == 1      # default: within one window
    tiled = ex.distance_maps(lr, scorer)["fea_up1"]
    assert tiled.shape == whole.shape == (40, 160)
    assert float((tiled - whole).abs().max()) < 1e-4                                  # float32 maps of ~10
    short = FeatureExtractor(flow, FeatureOptions(tile=40, margin=2, whole_max_pixels=0))
    err = short.stitching_error(lr, scorer, short.distance_maps(lr, scorer))
    assert err["levels"]["fea_up1"]["max_abs"] > 1e-3                                 # the check can fail
