"""Tiling: plans cover every pixel once, stitched features equal whole-image features beyond the receptive field."""
from __future__ import annotations

import pytest
import torch

from robustness_diag.data.tiling import crop_to, iter_tiled, pad_to_multiple, plan_tiles, tiled_map
from robustness_diag.ood import FeatureExtractor, FeatureOptions, conditioner_features, receptive_field
from tests.ood.helpers import one_thread, tiny_flow  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("h,w,tile,margin,align", [(10, 14, 4, 3, 2), (7, 5, 3, 0, 1), (8, 8, 8, 5, 2),
                                                   (40, 8, 16, 9, 4)])
def test_plan_covers_each_pixel_once_and_is_aligned(h, w, tile, margin, align):
    tiles = plan_tiles(h, w, tile, margin, align)
    cover = torch.zeros(h, w, dtype=torch.int64)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        for v in (t.y0, t.y1, t.x0, t.x1, t.ey0, t.ey1, t.ex0, t.ex1):
            assert v % align == 0 or v in (h, w)
        assert 0 <= t.ey0 <= t.y0 < t.y1 <= t.ey1 <= h and 0 <= t.ex0 <= t.x0 < t.x1 <= t.ex1 <= w
        if len(tiles) > 1:  # margins reach as far as the image allows
            m = -(-margin // align) * align
            assert t.y0 - t.ey0 == min(m, t.y0) and t.ey1 - t.y1 == min(m, h - t.y1)
    assert bool((cover == 1).all())


def test_plan_rejects_unpadded_sizes():
    with pytest.raises(ValueError, match="pad it first"):
        plan_tiles(7, 8, 4, 1, align=2)


def test_pad_and_crop_back():
    x = torch.arange(2 * 5 * 7, dtype=torch.float64).reshape(1, 2, 5, 7)
    y, size = pad_to_multiple(x, 4)
    assert y.shape == (1, 2, 8, 8) and size == (5, 7)
    assert torch.equal(y[..., :5, :7], x) and torch.equal(y[..., 7, :7], x[..., 4, :])   # replicate
    assert crop_to(y, size).shape[-2:] == (5, 7)
    assert crop_to(torch.zeros(1, 1, 4, 4), (7, 7), 0.5).shape[-2:] == (4, 4)            # ceil(7 * 0.5)
    assert crop_to(torch.zeros(1, 1, 16, 16), (7, 7), 2).shape[-2:] == (14, 14)


def test_tiled_map_of_a_pointwise_function_is_exact_and_batches_windows():
    x = torch.randn(1, 3, 12, 20, dtype=torch.float64)
    calls = []

    def fn(win):
        calls.append(win.shape[0])
        return {"same": win * 2, "up": torch.repeat_interleave(torch.repeat_interleave(win, 2, 2), 2, 3),
                "down": win[..., ::2, ::2]}

    out = tiled_map(x, fn, tile=4, margin=2, ratios={"same": 1, "up": 2, "down": 0.5}, align=2, batch=3)
    assert torch.equal(out["same"], x * 2)
    assert torch.equal(out["up"][..., ::2, ::2], x)
    assert torch.equal(out["down"], x[..., ::2, ::2])
    assert max(calls) <= 3 and sum(calls) == 15


LEVELS = ["fea_up2", "fea_up1", "fea_up0"]


@torch.no_grad()
def _full(flow, lr, align):
    x, size = pad_to_multiple(lr, align)
    from robustness_diag.ood import level_ratio
    return {k: crop_to(v, size, level_ratio(k)) for k, v in conditioner_features(flow, x, LEVELS).items()}


@pytest.mark.parametrize("h,w", [(44, 52), (37, 41)])
def test_stitched_features_equal_whole_image_features_with_receptive_field_margin(h, w):
    flow = tiny_flow().double()
    lr = torch.rand(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rf = receptive_field(flow, LEVELS)
    ex = FeatureExtractor(flow, FeatureOptions(levels=LEVELS, tile=16, margin=rf, batch=4))
    assert ex.describe()["stitch_exact"] and len(plan_tiles(*pad_to_multiple(lr, ex.align)[0].shape[-2:], 16, rf,
                                                            ex.align)) > 4
    tiled = ex.features(lr)
    full = _full(flow, lr, ex.align)
    for k in LEVELS:
        assert tiled[k].shape == full[k].shape
        assert float((tiled[k] - full[k]).abs().max()) < 1e-10, k
    # streaming vectors visit every valid position exactly once, with the same values
    vecs = list(ex.iter_vectors(lr))
    for k in LEVELS:
        got = torch.cat([v[k] for v in vecs])
        ref = full[k][0].flatten(1).T
        assert got.shape == ref.shape
        assert torch.allclose(got.sum(0), ref.sum(0), rtol=1e-10) and torch.allclose(
            (got ** 2).sum(0), (ref ** 2).sum(0), rtol=1e-10)


def test_too_small_margin_changes_features_so_the_check_can_fail():
    flow = tiny_flow().double()
    lr = torch.rand(1, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ex = FeatureExtractor(flow, FeatureOptions(levels=["fea_up1"], tile=16, margin=2))
    assert not ex.describe()["stitch_exact"]
    diff = (ex.features(lr)["fea_up1"] - _full(flow, lr, ex.align)["fea_up1"]).abs().max()
    assert float(diff) > 1e-6


def test_stitched_distance_maps_equal_untiled_maps():
    from robustness_diag.ood import fit_flow
    flow = tiny_flow().double()
    g = torch.Generator().manual_seed(4)
    scorer = fit_flow(flow, [torch.rand(3, 20, 24, dtype=torch.float64, generator=g) for _ in range(3)])
    scorer.compute_dtype = torch.float64
    lr = torch.rand(1, 3, 45, 38, dtype=torch.float64, generator=g)
    rf = receptive_field(flow, ["fea_up1"])
    whole = FeatureExtractor(flow, FeatureOptions(tile=512)).distance_maps(lr, scorer)["fea_up1"]
    tiled = FeatureExtractor(flow, FeatureOptions(tile=12, margin=rf, batch=2)).distance_maps(lr, scorer)["fea_up1"]
    assert whole.shape == (45, 38)
    assert float((whole - tiled).abs().max()) < 1e-5   # maps are float32


def test_iter_tiled_needs_one_image():
    with pytest.raises(ValueError, match="one image"):
        list(iter_tiled(torch.zeros(2, 3, 4, 4), lambda w: {}, plan_tiles(4, 4, 4, 0), {}))
