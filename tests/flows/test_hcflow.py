"""HCFlow (SR 4X/8X, ``flow.*`` keys): layouts, recognition, bounded coupling, density/sampling maths, exactness.

Exactness fixtures (tests/fixtures/reference/hcflow/README.md) hold outputs of the original HCFlow code; targets:
decode absolute 1e-4, objective relative 1e-5.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.config import HCFlowConfig
from robustness_diag.flows.errors import ArchitectureMismatchError
from robustness_diag.flows.hcflow import MAX_LOG_SCALE, AtanAffineCoupling, HCFlow
from robustness_diag.flows.recognition import infer_hcflow_config, recognize_family
from robustness_diag.flows.inspect import inspect_flow
from tests.synth import (build_state_dict, read_manifest, reduce_hcflow_manifest, small_hcflow_checkpoint,
                         state_hash, write_variant)

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "reference" / "hcflow").glob("*.pt"))


@pytest.fixture(scope="module")
def x4_path(tmp_path_factory):
    return small_hcflow_checkpoint(tmp_path_factory.mktemp("hcflow") / "x4.pth")


@pytest.fixture(scope="module")
def x4(x4_path):
    return rd.load_flow(x4_path)


def _lr(b=2, h=4, w=6, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, expect", [
    ("SR_DF2K_4X_HCFlow", dict(scale=4, L=2, K=[13, 13], n_cond_steps=[13, 13], rrdb_nb=[7, 7])),
    ("SR_CelebA_8X_HCFlow", dict(scale=8, L=3, K=[13, 13, 13], n_cond_steps=[13, 13, 13], rrdb_nb=[5, 5])),
])
def test_manifest_layout_detected_and_rebuilt_exactly(name, expect):
    entries = read_manifest(name)
    shapes = {k: torch.empty(s, device="meta") for k, s in entries}
    det = recognize_family(shapes.keys())
    assert (det.family, det.supported, det.coupling) == ("hcflow", True, "affine_atan")
    fields, problems = infer_hcflow_config(shapes)
    assert problems == [] and {k: fields[k] for k in expect} == expect
    with torch.device("meta"):
        model = HCFlow(HCFlowConfig.from_dict(fields))
    assert sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()) == sorted(
        (k, tuple(s)) for k, s in entries)


def test_reduced_checkpoint_loads_with_defaults(x4):
    assert x4.info["family"] == "hcflow" and x4.config.K == [2, 2] and x4.config.n_cond_steps == [1, 1]
    assert (x4.config.heat, x4.config.quant) == (0.9, 64)
    assert sorted(x4.info["defaulted"]) == ["heat", "quant"]


def test_truncated_file_names_missing_keys(tmp_path):
    sd = build_state_dict(reduce_hcflow_manifest(read_manifest("SR_DF2K_4X_HCFlow"), K=2, n_cond=1, rrdb_nb=1))
    with pytest.raises(ArchitectureMismatchError) as e:
        rd.load_flow(write_variant(sd, tmp_path / "cut.pth", "truncated"))
    assert e.value.missing and "cut.pth" in str(e.value)


def test_sampling_starts_from_lr_and_is_finite(x4):
    lr = _lr()
    with torch.no_grad():
        x0 = x4.decode(lr, heat=0.0)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        s1, s2 = x4.sample(lr, heat=0.9, generator=g1), x4.sample(lr, heat=0.9, generator=g2)
    assert x0.shape == (2, 3, 16, 24) and bool(torch.isfinite(s1).all())
    assert torch.equal(s1, s2) and not torch.equal(s1, x0)
    assert [tuple(s) for s in x4.latent_shapes(lr)] == [(2, 6, 8, 12), (2, 21, 4, 6)]
    feats = x4.features(lr)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"level0_condFlow": (2, 128, 8, 12),
                                                             "level1_condFlow": (2, 128, 4, 6)}


def test_encode_inverts_decode_and_log_prob_terms(x4):
    lr = _lr()
    lat = x4.draw_latents(lr, 0.8, torch.Generator().manual_seed(2))
    with torch.no_grad():
        hr, ladj_inv = x4.decode_with_ladj(lr, latents=lat)
        back, lp = x4.encode(hr, lr)
        noisy = x4.log_prob(hr, lr, noise=torch.zeros_like(hr))
    for a, b in zip(back, lat):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # zero noise only adds the reference's -ln(quant) * H * W offset
    torch.testing.assert_close(noisy, lp - math.log(64) * 16 * 24, rtol=1e-6, atol=1e-2)
    assert bool(torch.isfinite(lp).all())


def test_atan_coupling_inverse_slope_is_bounded_for_any_weights():
    c = AtanAffineCoupling(6, 0, hidden=8)
    with torch.no_grad():
        c.f.conv3.bias.fill_(1e6)  # scale logits far beyond any trained value
        c.f.conv3.bias[0::2] = 0.0
        y = torch.randn(1, 6, 4, 4)
        _, ladj = c.inverse_map(y)
    per_channel = ladj / c.c_co
    assert bool((per_channel.abs() <= MAX_LOG_SCALE + 1e-6).all()) and float(per_channel.abs().min()) > 0.49
    b = AtanAffineCoupling.inverse_slope_bound()
    assert b["max_inverse_slope"] == pytest.approx(math.exp(0.318 * math.pi / 2))
    assert b["min_inverse_slope"] == pytest.approx(1 / b["max_inverse_slope"])


def test_inspect_certifies_the_bound(x4):
    r = inspect_flow(x4)
    assert r["status"] == "ok" and "BOUNDED INVERSE" in r["verdict"] and "1.648" in r["verdict"]
    assert r["coupling_sub_transforms_on_sampling_path"] == 2 * 2 + 2 * 1


def test_yaml_config_and_own_checkpoint(x4, x4_path, tmp_path):
    import yaml
    opt = {"scale": 4, "quant": 64, "val": {"heats": [0, 0.7]},
           "network_G": {"flowDownsampler": {"K": 3, "L": 2, "hidden_channels": 64,
                                             "splitOff": {"after_flowstep": [1, 1], "RRDB_nb": [1, 1]}}}}
    p = tmp_path / "test_SR_4X.yml"
    p.write_text(yaml.safe_dump(opt))
    flow = rd.load_flow(x4_path, config=p)
    assert flow.config.heat == 0.7 and flow.info["sources"]["heat"] == "config"
    opt["network_G"]["flowDownsampler"]["K"] = 4
    p.write_text(yaml.safe_dump(opt))
    with pytest.raises(ArchitectureMismatchError, match="missing keys"):
        rd.load_flow(x4_path, config=p)
    back = rd.load_flow(rd.save_flow(x4, tmp_path / "hc.safetensors"))
    lr = _lr()
    with torch.no_grad():
        assert torch.equal(back.decode(lr, heat=0.0), x4.decode(lr, heat=0.0))


# -- exactness against the original HCFlow code ------------------------------------------------------------------------
@pytest.fixture(params=FIXTURES, ids=[p.stem for p in FIXTURES])
def case(request, tmp_path):
    fix = torch.load(request.param, weights_only=True)
    sd = build_state_dict(reduce_hcflow_manifest(read_manifest(fix["manifest"]), **fix["reduce"]), seed=fix["seed"])
    if state_hash(sd) != fix["state_sha256"]:
        pytest.fail(f"{request.param.name}: tests/synth.py no longer rebuilds the weights the reference ran on")
    path = tmp_path / "weights.pth"
    write_variant(sd, path, "raw")
    return fix, rd.load_flow(path)


def test_fixtures_present():
    assert [p.stem for p in FIXTURES] == ["hcflow_4x", "hcflow_8x"]


def test_decode_matches_reference(case):
    fix, flow = case
    lr = fix["inputs"]["lr"]
    with torch.no_grad():
        x0 = flow.decode(lr, heat=0.0)
        xe = flow.decode(lr, latents=list(fix["inputs"]["eps"]))
    torch.testing.assert_close(x0, fix["decode_raw_heat0"], rtol=0, atol=1e-4)
    torch.testing.assert_close(x0.clamp(0, 1), fix["decode_heat0_clamped"], rtol=0, atol=1e-4)
    torch.testing.assert_close(xe, fix["decode_raw_eps"], rtol=0, atol=1e-4)


def test_objective_matches_reference(case):
    fix, flow = case
    inp = fix["inputs"]
    with torch.no_grad():
        lp = flow.log_prob(inp["hr"], inp["lr"])
        lpn = flow.log_prob(inp["hr"], inp["lr"], noise=fix["noise"])
    torch.testing.assert_close(lp, fix["objective_nonoise"], rtol=1e-5, atol=0)
    torch.testing.assert_close(lpn, fix["objective_noise"], rtol=1e-5, atol=0)


def test_features_match_reference(case):
    fix, flow = case
    with torch.no_grad():
        feats = flow.features(fix["inputs"]["lr"])
    for name, ref in fix["features_b0_every8th_channel"].items():
        torch.testing.assert_close(feats[name][0, ::8], ref, rtol=1e-5, atol=1e-5)
