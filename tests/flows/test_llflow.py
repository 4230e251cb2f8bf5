"""LLFlow (low-light, scale 1): layouts, recognition, preprocessing, density/sampling maths, exactness, inspection.

Exactness fixtures (tests/fixtures/reference/llflow/README.md) hold outputs of the original LLFlow code; targets:
log_prob relative 1e-5, decode absolute 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import robustness_diag as rd
from robustness_diag.data.lowlight import equalize_hist, lowlight_condition
from robustness_diag.flows.errors import ArchitectureMismatchError
from robustness_diag.flows.inspect import inspect_flow
from robustness_diag.flows.layers import squeeze2d
from robustness_diag.flows.llflow import LLFlow
from robustness_diag.flows.recognition import infer_architecture, recognize_family
from tests.synth import (build_state_dict, read_manifest, reduce_manifest, small_llflow_checkpoint,
                         state_hash, write_variant)

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "reference" / "llflow").glob("*.pt"))
MANIFESTS = ["LLFlow_LOL-pc", "LLFlow_LOL_smallNet"]


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    return small_llflow_checkpoint(tmp_path_factory.mktemp("llflow") / "small.pth")


@pytest.fixture(scope="module")
def small(small_path):
    return rd.load_flow(small_path)


def _dark(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 0.25).round(decimals=2)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_layout_detected_and_rebuilt_exactly(name):
    entries = read_manifest(name)
    shapes = {k: torch.empty(s, device="meta") for k, s in entries}
    det = recognize_family(shapes.keys())
    assert (det.family, det.supported, det.coupling) == ("llflow", True, "affine")
    fields, problems = infer_architecture(shapes, det)
    assert problems == []
    got = (fields["scale"], fields["in_nc"], fields["encoder_in_nc"], fields["L"], fields["splits"])
    assert got == (1, 3, 12, 3, [])
    expect = {"LLFlow_LOL-pc": (64, 24, [12] * 3, 320), "LLFlow_LOL_smallNet": (32, 4, [4] * 3, 64)}[name]
    assert (fields["nf"], fields["nb"], fields["K"], fields["cond_channels"]) == expect
    blocks = [1, 3, 5, 7] if name.endswith("pc") else [1]
    cfg = rd.FlowConfig.from_dict({**fields, "blocks": blocks})
    with torch.device("meta"):
        model = LLFlow(cfg)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [(k, tuple(s)) for k, s in entries]


def test_reduced_checkpoint_loads_with_reference_defaults(small):
    assert small.info["family"] == "llflow" and small.info["variant"].startswith("LLFlow")
    assert small.config.blocks == [1] and small.info["sources"]["blocks"] == "defaulted"
    assert small.config.heat == 0.0 and small.config.scale == 1
    assert isinstance(small, rd.SRFlowFamily)  # samplers/tracers written for the SRFlow family apply


def test_wrapped_and_prefixed_files_are_still_llflow(tmp_path):
    sd = build_state_dict(reduce_manifest(read_manifest("LLFlow_LOL_smallNet"), nb=2, K=2), seed=3)
    for kind in ("module_prefix", "wrapped_state_dict"):
        flow = rd.load_flow(write_variant(sd, tmp_path / f"{kind}.pth", kind))
        assert flow.config.family == "llflow"


def test_truncated_file_names_missing_keys(tmp_path):
    sd = build_state_dict(reduce_manifest(read_manifest("LLFlow_LOL_smallNet"), nb=2, K=2), seed=3)
    with pytest.raises(ArchitectureMismatchError) as e:
        rd.load_flow(write_variant(sd, tmp_path / "t.pth", "truncated"))
    assert e.value.missing and "t.pth" in str(e.value)


def test_preprocessing_is_log_input_and_cv2_histeq():
    x = _dark()
    c = lowlight_condition(x)
    assert c.shape == (2, 6, 16, 16)
    torch.testing.assert_close(c[:, :3], torch.log(torch.clamp(x + 1e-3, min=1e-3)), rtol=0, atol=0)
    q = np.rint(x.numpy() * 255).astype(np.uint8)
    want = np.stack([np.stack([cv2.equalizeHist(q[b, ch]) for ch in range(3)]) for b in range(2)]) / 255.0
    np.testing.assert_array_equal(c[:, 3:].numpy(), want.astype(np.float32))
    assert float(equalize_hist(x).max()) == 1.0  # equalisation stretches every channel to the full range


def test_rgb_and_preprocessed_inputs_agree(small):
    x = _dark()
    with torch.no_grad():
        torch.testing.assert_close(small.decode(x), small.decode(lowlight_condition(x)), rtol=0, atol=0)


def test_heat0_decode_is_the_colour_map_latent_and_sampling_is_finite(small):
    x = _dark()
    with torch.no_grad():
        cmap = small.color_map(x)
        assert cmap.shape == (2, 3, 16, 16) and bool(((cmap > 0) & (cmap < 1)).all())
        z = squeeze2d(cmap, 8)
        assert z.shape == (2, 192, 2, 2)
        torch.testing.assert_close(small.decode(x), small.decode(x, latents=[z]), rtol=0, atol=0)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        s1, s2 = small.sample(x, heat=0.7, generator=g1), small.sample(x, heat=0.7, generator=g2)
    assert torch.equal(s1, s2) and bool(torch.isfinite(s1).all())
    assert not torch.equal(s1, small.decode(x))
    feats = small.features(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "fea_up2": (2, 64, 8, 8), "fea_up1": (2, 64, 4, 4), "fea_up0": (2, 64, 2, 2)}


def test_log_prob_is_change_of_variables_of_the_decode(small):
    x, hr = _dark(seed=1), _dark(seed=2) * 3
    with torch.no_grad():
        (z,), lp = small.encode(hr, x)
        back, ladj_inv = small.decode_with_ladj(x, latents=[z])
        mean = squeeze2d(small.color_map(x), 8)
        prior = (-0.5 * ((z - mean) ** 2 + np.log(2 * np.pi))).sum(dim=(1, 2, 3))
    torch.testing.assert_close(back, hr, rtol=0, atol=1e-4)
    # log p(hr) = log N(z; mean, I) + log|dz/dhr| and log|dhr/dz| = -log|dz/dhr|
    torch.testing.assert_close(lp, prior - ladj_inv, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(small.log_prob(hr, x), lp, rtol=0, atol=0)


def test_bad_sizes_and_channels_are_named(small):
    with pytest.raises(ValueError, match="12x16 is not divisible by 8"):
        small.decode(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] or its 6-channel"):
        small.features(torch.rand(1, 4, 16, 16))


def test_inspect_flags_the_unbounded_affine_and_unused_heads(small):
    r = inspect_flow(small)
    assert r["status"] == "warning" and "1e+04" in r["verdict"]
    assert r["coupling_sub_transforms_on_sampling_path"] == 2 * 3 * 2  # 2 couplings/level x 3 levels x 2 stages
    assert "ConEncoder1 heads never run (HRconv, conv_last, downconv3, awb_para)" in r["unused_keys"]
    assert r["unused_keys"]["ConEncoder1 heads never run (HRconv, conv_last, downconv3, awb_para)"]["count"] == 8


def test_own_checkpoint_round_trip(small, tmp_path):
    path = rd.save_flow(small, tmp_path / "ll.safetensors")
    back = rd.load_flow(path)
    x = _dark()
    assert back.config.family == "llflow" and back.config.encoder_in_nc == 12
    with torch.no_grad():
        assert torch.equal(back.decode(x), small.decode(x))


def test_upstream_yaml_overrides_are_read(small_path, tmp_path):
    import yaml
    conf = {"scale": 1, "cond_encoder": "ConEncoder1", "concat_histeq": True, "heat": 0,
            "datasets": {"train": {"log_low": True, "GT_size": 160}},
            "network_G": {"in_nc": 3, "nf": 32, "nb": 2, "flow": {"K": 2, "L": 3, "additionalFlowNoAffine": 2,
                          "conditionInFeaDim": 64, "split": {"enable": False}, "stackRRDB": {"blocks": [0]}}}}
    p = tmp_path / "LOL_small.yml"
    p.write_text(yaml.safe_dump(conf))
    flow = rd.load_flow(small_path, config=p)
    assert flow.config.blocks == [0] and flow.info["sources"]["blocks"] == "config"
    conf["to_yuv"] = True
    p.write_text(yaml.safe_dump(conf))
    with pytest.raises(rd.CheckpointError, match="to_yuv"):
        rd.load_flow(small_path, config=p)


# -- exactness against the original LLFlow code ------------------------------------------------------------------------
@pytest.fixture(params=FIXTURES, ids=[p.stem for p in FIXTURES])
def case(request, tmp_path):
    fix = torch.load(request.param, weights_only=True)
    sd = build_state_dict(reduce_manifest(read_manifest(fix["manifest"]), **fix["reduce"]), seed=fix["seed"])
    if state_hash(sd) != fix["state_sha256"]:
        pytest.fail(f"{request.param.name}: tests/synth.py no longer rebuilds the weights the reference ran on")
    path = tmp_path / "weights.pth"
    write_variant(sd, path, "raw")
    return fix, rd.load_flow(path, config=fix["config"])


def test_fixtures_present():
    assert [p.stem for p in FIXTURES] == ["llflow_pc", "llflow_small"]


def test_condition_and_features_match_reference(case):
    fix, flow = case
    img = fix["inputs"]["img_u8"].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(lowlight_condition(img), fix["lr_condition"], rtol=0, atol=1e-6)
        feats = flow.features(img)
        torch.testing.assert_close(flow.color_map(img), fix["color_map"], rtol=0, atol=1e-6)
    for name, ref in fix["features_b0_every8th_channel"].items():
        torch.testing.assert_close(feats[name][0, ::8], ref, rtol=1e-5, atol=1e-5)


def test_log_prob_matches_reference(case):
    fix, flow = case
    img = fix["inputs"]["img_u8"].float() / 255
    with torch.no_grad():
        (z,), lp = flow.encode(fix["inputs"]["hr"], img)
    torch.testing.assert_close(lp, fix["objective"], rtol=1e-5, atol=0)
    torch.testing.assert_close(z, fix["encode_z"], rtol=0, atol=1e-4)


def test_decode_matches_reference(case):
    fix, flow = case
    img = fix["inputs"]["img_u8"].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(flow.decode(img), fix["decode"], rtol=0, atol=1e-4)
        torch.testing.assert_close(flow.decode(fix["lr_condition"]), fix["decode"], rtol=0, atol=1e-4)
        torch.testing.assert_close(flow.decode(img, latents=[fix["inputs"]["z"]]), fix["decode_given_z"],
                                   rtol=0, atol=1e-4)
