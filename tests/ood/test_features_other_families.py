"""Feature levels, tiling and the OOD fit for LLFlow (scale 1, global preprocessing) and HCFlow
(`level{l}_condFlow`)."""
from __future__ import annotations

import math

import pytest
import torch

import robustness_diag as rd
from robustness_diag.data.lowlight import darken
from robustness_diag.ood import (FeatureExtractor, FeatureOptions, available_levels, conditioner_features,
                                 default_level, feature_channels, feature_levels, fit_flow, lr_alignment,
                                 receptive_field)
from tests.synth import small_hcflow_checkpoint, small_llflow_checkpoint


@pytest.fixture(scope="module")
def llflow(tmp_path_factory):
    return rd.load_flow(small_llflow_checkpoint(tmp_path_factory.mktemp("ll") / "ll.pth")).eval()


@pytest.fixture(scope="module")
def hcflow(tmp_path_factory):
    return rd.load_flow(small_hcflow_checkpoint(tmp_path_factory.mktemp("hc") / "hc.pth")).eval()


def _photo(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def test_level_tables_follow_each_family(llflow, hcflow):
    assert feature_levels(llflow) == {"fea_up2": 0.5, "fea_up1": 0.25, "fea_up0": 0.125}
    assert default_level(llflow) == "fea_up2" and feature_channels(llflow) == llflow.config.cond_channels
    assert lr_alignment(llflow, ["fea_up0"]) == 8
    assert feature_levels(hcflow) == {"level0_condFlow": 2.0, "level1_condFlow": 1.0}
    assert default_level(hcflow) == "level1_condFlow" and feature_channels(hcflow) == 128
    assert available_levels(hcflow) == ["level0_condFlow", "level1_condFlow"]
    assert receptive_field(hcflow, ["level1_condFlow"]) == 2 + 15 * 2
    with pytest.raises(ValueError, match="fea_up1"):
        FeatureExtractor(hcflow, FeatureOptions(levels=["fea_up1"]))


def test_llflow_features_take_the_raw_dark_image_and_match_the_flow(llflow):
    x = darken(_photo(64, 96))
    with torch.no_grad():
        want = llflow.features(x)
        got = FeatureExtractor(llflow, FeatureOptions(levels=list(want))).features(x)
    for k in want:
        assert got[k].shape == (1, llflow.config.cond_channels, int(64 * feature_levels(llflow)[k]),
                                int(96 * feature_levels(llflow)[k]))
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_llflow_tiles_see_the_whole_image_preprocessing(llflow):
    """Histogram equalisation is global: tiles must be cut from the preprocessed image, not preprocessed alone.
    With a margin >= the receptive field, tiled features equal whole-image ones; sizes not divisible by 8 are padded
    and cropped back."""
    x = darken(_photo(250, 236, seed=1))
    rf = receptive_field(llflow, ["fea_up2"])
    assert rf == 4 + 2 * (15 * 2 + 1)
    with torch.no_grad():
        whole = FeatureExtractor(llflow, FeatureOptions(tile=1024)).features(x)["fea_up2"]
        tiled = FeatureExtractor(llflow, FeatureOptions(tile=32, margin=rf + 6, batch=4)).features(x)["fea_up2"]
    assert whole.shape[-2:] == (125, 118)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    # a tile preprocessed on its own would differ: the equalised channels depend on the whole image's histogram
    from robustness_diag.data.lowlight import lowlight_condition
    part = x[..., :64, :64]
    assert not torch.equal(lowlight_condition(part), lowlight_condition(x)[..., :64, :64])


def test_hcflow_lr_level_fast_path_and_tiling(hcflow):
    x = _photo(40, 36, seed=2)
    with torch.no_grad():
        full = hcflow.features(x)
        fast = conditioner_features(hcflow, x, ["level1_condFlow"])
        both = conditioner_features(hcflow, x, ["level0_condFlow", "level1_condFlow"])
        tiled = FeatureExtractor(hcflow, FeatureOptions(tile=8, margin=receptive_field(hcflow, ["level1_condFlow"]),
                                                        whole_max_pixels=0))           # tiled though it fits one window
        t = tiled.features(x)["level1_condFlow"]
    torch.testing.assert_close(fast["level1_condFlow"], full["level1_condFlow"], rtol=0, atol=0)
    torch.testing.assert_close(both["level0_condFlow"], full["level0_condFlow"], rtol=0, atol=0)
    torch.testing.assert_close(t, full["level1_condFlow"], rtol=1e-5, atol=1e-5)


def test_fit_on_dark_images_scores_bright_ones_as_out_of_distribution(llflow):
    """The LLFlow fit streams dark images; the normal-light version of a held-out image is further from them than
    its dark version (random weights: only the direction is asserted; measured 8.4 vs 6.5)."""
    train = [darken(_photo(64, 64, seed=s)) for s in range(4)]
    scorer = fit_flow(llflow, train)
    assert scorer.meta["flow_family"] == "llflow" and scorer.level_names == ["fea_up2"]
    ex = FeatureExtractor(llflow, FeatureOptions())
    dark = ex.distance_maps(darken(_photo(64, 64, seed=9)), scorer)["fea_up2"]
    bright = ex.distance_maps(_photo(64, 64, seed=9), scorer)["fea_up2"]
    assert dark.shape == (32, 32) and math.isfinite(float(dark.mean()))
    assert float(bright.mean()) > float(dark.mean())
