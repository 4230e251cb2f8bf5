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
    ex = FeatureExtractor(flow, FeatureOptions(levels=LEVELS, tile=16, margin=rf, batch=4, whole_max_pixels=0))
    assert ex.describe()["stitch_exact"] and ex.n_tiles(h, w) > 4
    assert FeatureExtractor(flow, FeatureOptions(levels=LEVELS, tile=16)).n_tiles(h, w) == 1   # within one window
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
    assert not ex.describe()["stitch_exact"] and ex.n_tiles(40, 40) == 9
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
    tiled = FeatureExtractor(flow, FeatureOptions(tile=12, margin=rf, batch=2, whole_max_pixels=0)).distance_maps(
        lr, scorer)["fea_up1"]
    assert whole.shape == (45, 38)
    assert float((whole - tiled).abs().max()) < 1e-5   # maps are float32


def test_iter_tiled_needs_one_image():
    with pytest.raises(ValueError, match="one image"):
        list(iter_tiled(torch.zeros(2, 3, 4, 4), lambda w: {}, plan_tiles(4, 4, 4, 0), {}))


def test_whole_image_rule_bounds_memory_by_one_window():
    # 12x4 with tile 4 and margin 2: the image (48 px) is smaller than one window (8x8 = 64 px): one piece
    assert len(plan_tiles(12, 4, 4, 2)) == 3 and len(plan_tiles(12, 4, 4, 2, whole_max_pixels=64)) == 1
    assert len(plan_tiles(12, 8, 4, 2, whole_max_pixels=64)) == 6                   # 96 px > 64: tiled
    flow = tiny_flow()
    ex = FeatureExtractor(flow, FeatureOptions(tile=16))                             # margin = rf = 32
    assert ex.margin == ex.rf == 32 and ex.whole_max_pixels == (16 + 2 * 32) ** 2 and ex.exact
    assert ex.n_tiles(80, 80) == 1 and ex.n_tiles(80, 82) == 5 * 6                  # 6400 px fit, 6560 do not
    d = ex.describe()
    assert d["margin_source"] == "receptive field" and d["stitch_exact"] and d["whole_max_pixels"] == 6400
    small = FeatureExtractor(flow, FeatureOptions(tile=16, margin=3))                # rounded up to the alignment
    assert small.margin == 4 and not small.exact and small.describe()["margin_source"] == "given"


@pytest.mark.parametrize("h,w,whole_image", [(40, 46, True), (96, 100, False)])
def test_stitching_error_is_the_error_of_the_checked_box(h, w, whole_image):
    """The measured error equals |stitched - whole-image| over the documented box (the whole image when it is within
    (2 x 16 + 2 x receptive field)^2 pixels), and is ~0 with an exact margin."""
    from robustness_diag.ood import fit_flow
    flow = tiny_flow().double()
    g = torch.Generator().manual_seed(5)
    scorer = fit_flow(flow, [torch.rand(3, 20, 24, dtype=torch.float64, generator=g) for _ in range(3)])
    scorer.compute_dtype = torch.float64
    lr = torch.rand(1, 3, h, w, dtype=torch.float64, generator=g)
    full = FeatureExtractor(flow, FeatureOptions(tile=512)).distance_maps(lr, scorer)["fea_up1"]
    ex = FeatureExtractor(flow, FeatureOptions(tile=16, margin=2))
    maps = ex.distance_maps(lr, scorer)
    err = ex.stitching_error(lr, scorer, maps)
    y0, y1, x0, x1 = err["box"]
    assert err["whole_image"] is whole_image
    assert (y0, y1, x0, x1) == ((0, h, 0, w) if whole_image else (0, 32, 0, 32))   # 16 px around corner (16, 16)
    ref = float((maps["fea_up1"][y0:y1, x0:x1] - full[y0:y1, x0:x1]).abs().max())
    assert ref > 1e-4 and err["levels"]["fea_up1"]["max_abs"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert err["levels"]["fea_up1"]["positions"] == (y1 - y0) * (x1 - x0)
    if whole_image:                                                # (the larger image: too slow for twice)
        exact = FeatureExtractor(flow, FeatureOptions(tile=16, whole_max_pixels=0))
        e2 = exact.stitching_error(lr, scorer, exact.distance_maps(lr, scorer))
        assert e2["levels"]["fea_up1"]["max_abs"] < 1e-5
    assert FeatureExtractor(flow, FeatureOptions(tile=128)).stitching_error(lr, scorer, maps) is None  # one piece
