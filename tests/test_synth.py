"""Tests of the synthetic-checkpoint builder ``tests/synth.py`` (the oracle must itself be right)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.synth import (DELETE, LAYER_PREFIX, VARIANT_KINDS, build_state_dict, count_params,
                         layer_plan, manifest_names, read_manifest, reduce_manifest, write_variant,
                         write_yaml_config)

# (tensors, params) of the original checkpoint files, as their manifests in tests/fixtures/manifests list them
REFERENCE_COUNTS = {
    "SRFlow_DF2K_4X": (1733, 39_541_811),
    "SRFlow_DF2K_8X": (2080, 50_821_891),
    "SRFlow_CelebA_8X": (1630, 40_030_531),
    "NCSR_4X": (2165, 41_662_643),
    "NCSR_8X": (3136, 64_520_163),
    "rNF_4X_RQs": (2219, 46_724_435),
    "rNF_4X_RQs_permtrain": (2165, 46_545_587),
    "rNF_8X_RQs": (3224, 78_159_939),
    "rNF_4X_Bspline": (2219, 63_814_739),
    "rNF_4X_AffReparam": (2165, 41_662_643),
    "LLFlow_LOL-pc": (1516, 38_859_481),
    "LLFlow_LOL_smallNet": (412, 5_429_849),
    "SR_DF2K_4X_HCFlow": (1478, 23_232_539),
    "SR_CelebA_8X_HCFlow": (1857, 27_017_723),
    "SRFlow-DA_DF2K_4X": (1067, 25_388_627),
    "SRFlow-DA_DF2K_8X": (1252, 30_014_883),
}


@pytest.fixture(scope="module")
def srflow4x():
    return read_manifest("SRFlow_DF2K_4X")


@pytest.fixture(scope="module")
def small4x(srflow4x):
    return reduce_manifest(srflow4x, nb=5, K=2)


def _layer_keys(entries, i):
    prefix = f"{LAYER_PREFIX}{i}."
    return [k for k, _ in entries if k.startswith(prefix)]


# ---------------------------------------------------------------- manifests

@pytest.mark.parametrize("name", manifest_names())
def test_every_manifest_reads(name):
    entries = read_manifest(name)
    assert entries and len({k for k, _ in entries}) == len(entries)
    assert all(isinstance(s, tuple) and all(d > 0 for d in s) for _, s in entries)
    if name in REFERENCE_COUNTS:
        assert (len(entries), count_params(entries)) == REFERENCE_COUNTS[name]


def test_manifest_shapes_spot_checks(srflow4x):
    shapes = dict(srflow4x)
    assert shapes["RRDB.conv_first.weight"] == (64, 3, 3, 3)
    assert shapes["RRDB.conv_first.bias"] == (64,)
    assert shapes[f"{LAYER_PREFIX}3.affine.fAffine.0.weight"] == (64, 326, 3, 3)
    assert shapes[f"{LAYER_PREFIX}19.conv.weight"] == (12, 6, 3, 3)
    assert shapes[f"{LAYER_PREFIX}57.affine.fFeatures.4.bias"] == (192,)
    assert shapes["flowUpsamplerNet.f.0.weight"] == (96, 320, 3, 3)


# ---------------------------------------------------------------- reduce_manifest

def test_reduce_is_identity_without_arguments(srflow4x):
    assert reduce_manifest(srflow4x) == srflow4x


def test_reduce_trunk(small4x):
    trunk = {int(k.split(".")[2]) for k, _ in small4x if k.startswith("RRDB.RRDB_trunk.")}
    assert trunk == set(range(5))


def test_reduce_layer_plan_4x(small4x):
    level = ["squeeze", "step", "step", "coupling", "coupling"]
    assert layer_plan(small4x) == level + ["split"] + level + level
    for sq in (0, 6, 11):
        assert _layer_keys(small4x, sq) == []
    assert _layer_keys(small4x, 5) == [f"{LAYER_PREFIX}5.conv.{p}" for p in ("weight", "bias", "logs")]


def test_reduce_keeps_shapes_order_and_f0(srflow4x, small4x):
    shapes = dict(small4x)
    assert shapes[f"{LAYER_PREFIX}3.affine.fAffine.0.weight"] == (64, 326, 3, 3)   # level 1, C=12
    assert shapes[f"{LAYER_PREFIX}5.conv.weight"] == (12, 6, 3, 3)
    assert shapes[f"{LAYER_PREFIX}9.affine.fAffine.0.weight"] == (64, 332, 3, 3)   # level 2, C=24
    assert shapes[f"{LAYER_PREFIX}15.affine.fFeatures.4.bias"] == (192,)          # level 3, C=96
    assert shapes["flowUpsamplerNet.f.0.weight"] == (96, 320, 3, 3)
    assert small4x[-1][0] == "flowUpsamplerNet.f.0.bias"
    # layer keys come in ascending index order; non-layer keys keep their original relative order
    idx = [int(k.split(".")[2]) for k, _ in small4x if k.startswith(LAYER_PREFIX)]
    assert idx == sorted(idx)
    others = [k for k, _ in small4x if not k.startswith(LAYER_PREFIX)]
    assert others == [k for k, _ in srflow4x if k in set(others)]


def test_reduce_8x_two_splits_and_per_level_k():
    entries = reduce_manifest(read_manifest("NCSR_8X"), nb=3, K=[1, 2, 3, 1])
    plan = layer_plan(entries)
    assert plan == (["squeeze", "step", "step"] + ["coupling"] + ["split"]
                    + ["squeeze", "step", "step"] + ["coupling"] * 2 + ["split"]
                    + ["squeeze", "step", "step"] + ["coupling"] * 3
                    + ["squeeze", "step", "step"] + ["coupling"])


def test_reduce_frozen_rq_layout():
    entries = reduce_manifest(read_manifest("rNF_4X_RQs"), nb=2, K=1)
    assert layer_plan(entries).count("coupling") == 3
    keys = _layer_keys(entries, 3)
    assert f"{LAYER_PREFIX}3.invconv.weight_transpose" in keys
    assert any(".rqspline.fRQspline_std." in k for k in keys)


# ---------------------------------------------------------------- build_state_dict

@pytest.fixture(scope="module")
def small_sd(small4x):
    return build_state_dict(small4x, seed=0)


def test_build_deterministic_and_shaped(small4x, small_sd):
    again = build_state_dict(small4x, seed=0)
    other = build_state_dict(small4x, seed=1)
    assert list(small_sd) == [k for k, _ in small4x]
    for key, shape in small4x:
        assert tuple(small_sd[key].shape) == shape and small_sd[key].dtype == torch.float32
        assert torch.equal(small_sd[key], again[key])
    key = f"{LAYER_PREFIX}3.affine.fAffine.0.weight"
    assert not torch.equal(small_sd[key], other[key])


def test_build_dtype(small4x):
    sd = build_state_dict(small4x[:50], dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in sd.values())


def test_build_value_rules(small_sd):
    assert torch.all(small_sd["RRDB.conv_first.bias"] == 0)
    assert torch.all(small_sd["flowUpsamplerNet.f.0.bias"] == 0)
    w = small_sd["RRDB.RRDB_trunk.0.RDB1.conv5.weight"]              # fan_in 192*9
    assert w.std().item() == pytest.approx((2 / (192 * 9)) ** 0.5 * 0.1, rel=0.05)
    assert small_sd[f"{LAYER_PREFIX}1.actnorm.logs"].abs().max() < 0.05
    assert small_sd[f"{LAYER_PREFIX}3.affine.fFeatures.0.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    assert small_sd[f"{LAYER_PREFIX}3.affine.fFeatures.4.weight"].std().item() == pytest.approx(0.002, rel=0.1)
    split_bias = small_sd[f"{LAYER_PREFIX}5.conv.bias"]
    assert split_bias.abs().max() < 0.3                               # no scale offset on Split2d


def test_build_affine_scale_bias(small4x, small_sd):
    bias = small_sd[f"{LAYER_PREFIX}15.affine.fFeatures.4.bias"]    # 192 channels
    assert bias[1::2].mean().item() == pytest.approx(3.0, abs=0.05)
    assert bias[0::2].abs().mean().item() < 0.1
    scale = torch.sigmoid(bias[1::2] + 2) + 1e-4
    assert torch.all((scale > 0.99) & (scale < 1.0))
    untrained = build_state_dict(small4x, seed=0, affine_scale_bias=0.0)
    assert untrained[f"{LAYER_PREFIX}15.affine.fFeatures.4.bias"].abs().max() < 0.3


def test_build_no_scale_bias_for_splines():
    entries = reduce_manifest(read_manifest("rNF_4X_RQs"), nb=1, K=1)
    sd = build_state_dict(entries)
    assert sd[f"{LAYER_PREFIX}3.rqspline.fFeatures.4.bias"].abs().max() < 0.3


def test_build_invconv_orthogonal(small_sd):
    w = small_sd[f"{LAYER_PREFIX}9.invconv.weight"].double()
    assert w.shape == (24, 24)
    assert torch.allclose(w @ w.T, torch.eye(24, dtype=torch.float64), atol=1e-5)
    assert not torch.equal(small_sd[f"{LAYER_PREFIX}3.invconv.weight"], small_sd[f"{LAYER_PREFIX}4.invconv.weight"])


def test_build_frozen_invconv_transpose():
    entries = reduce_manifest(read_manifest("rNF_4X_RQs"), nb=1, K=1)
    sd = build_state_dict(entries)
    for i in (1, 3, 6, 8, 10, 12):
        w = sd[f"{LAYER_PREFIX}{i}.invconv.weight"]
        wt = sd[f"{LAYER_PREFIX}{i}.invconv.weight_transpose"]
        assert w.dim() == 4 and w.shape[2:] == (1, 1)
        assert torch.equal(wt[:, :, 0, 0], w[:, :, 0, 0].T)
        eye = torch.eye(w.shape[0])
        assert torch.allclose(w[:, :, 0, 0] @ wt[:, :, 0, 0], eye, atol=1e-5)


def test_build_full_size_4x(srflow4x):
    sd = build_state_dict(srflow4x, seed=0)
    assert len(sd) == 1733
    assert sum(v.numel() for v in sd.values()) == 39_541_811
    assert all(torch.isfinite(v).all() for v in sd.values())


# ---------------------------------------------------------------- write_variant

@pytest.fixture(scope="module")
def tiny_sd(small4x):
    return build_state_dict(small4x[:40], seed=0)


@pytest.mark.parametrize("kind", [k for k in VARIANT_KINDS if not k.startswith("malicious")])
def test_write_variant_files(tmp_path, tiny_sd, kind):
    path = write_variant(tiny_sd, tmp_path / f"{kind}.pth", kind)
    assert path.is_file() and path.stat().st_size > 0
    if kind in ("not_checkpoint", "truncated_file"):
        with pytest.raises((pickle.UnpicklingError, RuntimeError, EOFError)):   # what torch raises for each
            torch.load(path, map_location="cpu", weights_only=True)
        return
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if kind in ("raw", "legacy"):
        assert list(obj) == list(tiny_sd) and torch.equal(obj["RRDB.conv_first.weight"],
                                                          tiny_sd["RRDB.conv_first.weight"])
    elif kind == "module_prefix":
        assert list(obj) == [f"module.{k}" for k in tiny_sd]
    elif kind == "wrapped_state_dict":
        assert list(obj) == ["state_dict"] and list(obj["state_dict"]) == list(tiny_sd)
    elif kind == "wrapped_params_ema":
        assert set(obj) == {"params_ema", "params"} and list(obj["params_ema"]) == list(tiny_sd)
    elif kind == "truncated":
        assert list(obj) == list(tiny_sd)[:30]
    elif kind == "training_state":
        assert {"epoch", "iter", "optimizers", "schedulers"} <= set(obj)


def test_write_variant_rejects_unknown_kind(tmp_path, tiny_sd):
    with pytest.raises(ValueError):
        write_variant(tiny_sd, tmp_path / "x.pth", "nonsense")


def _plain_unpickle_in_subprocess(path):
    code = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_malicious_pickle_is_real(tmp_path):
    marker = tmp_path / "pwned"
    path = write_variant({}, tmp_path / "evil.pth", "malicious_pickle", marker=marker)
    assert path.read_bytes()[:2] == b"\x80\x02"                      # pickle protocol 2
    assert not marker.exists()
    _plain_unpickle_in_subprocess(path)
    assert marker.exists()                                            # the fixture does bite


@pytest.mark.parametrize("kind", ["malicious_pickle", "malicious_zip"])
def test_weights_only_load_refuses_malicious(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = write_variant({}, tmp_path / "evil.pth", kind, marker=marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not marker.exists()


def test_malicious_zip_is_real(tmp_path):
    marker = tmp_path / "pwned"
    path = write_variant({}, tmp_path / "evil.pth", "malicious_zip", marker=marker)
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    assert marker.exists()


def test_malicious_needs_marker(tmp_path):
    with pytest.raises(ValueError):
        write_variant({}, tmp_path / "evil.pth", "malicious_pickle")


# ---------------------------------------------------------------- write_yaml_config

def test_yaml_config_defaults_and_merge(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = write_yaml_config(tmp_path / "c.yml", scale=8, divide_freq=True,
                             network_G={"nb": 5, "flow": {"K": 2, "L": 4, "S": [0, 0, 2, 2],
                                                          "stackRRDB": {"blocks": [0, 1, 3, 4]},
                                                          "fea_up0": DELETE}})
    conf = yaml.safe_load(path.read_text())
    net, flow = conf["network_G"], conf["network_G"]["flow"]
    assert conf["scale"] == 8 and net["upscale"] == 8 and conf["divide_freq"] is True
    assert net["nb"] == 5 and net["nf"] == 64 and net["which_model_G"] == "SRFlowNet"
    assert (flow["K"], flow["L"], flow["S"]) == (2, 4, [0, 0, 2, 2])
    assert flow["stackRRDB"] == {"blocks": [0, 1, 3, 4], "concat": True}
    assert flow["split"] == {"enable": True} and "fea_up0" not in flow
    assert flow["CondAffineSeparatedAndCond"] == {"eps": 0.0001, "hidden_channels": 64}


def test_yaml_config_default_is_srflow_4x(tmp_path):
    yaml = pytest.importorskip("yaml")
    conf = yaml.safe_load(write_yaml_config(tmp_path / "c.yml").read_text())
    flow = conf["network_G"]["flow"]
    assert conf["scale"] == 4 and conf["network_G"]["nb"] == 23
    assert (flow["K"], flow["L"], flow["additionalFlowNoAffine"]) == (16, 3, 2)
    assert flow["stackRRDB"]["blocks"] == [1, 8, 15, 22]
    assert os.path.getsize(tmp_path / "c.yml") < 2000


# ---------------------------------------------------------------- sanity of the values (tiny oracle decode)

def _actnorm(x, sd, p):
    return (x + sd[p + "bias"]) * torch.exp(sd[p + "logs"])


def _subnet(x, sd, p):
    """The SRFlow coupling sub-net F: Conv2d+ActNorm, ReLU, 1x1 Conv2d+ActNorm, ReLU, Conv2dZeros."""
    x = torch.relu(_actnorm(F.conv2d(x, sd[p + ".0.weight"], padding=1), sd, p + ".0.actnorm."))
    x = torch.relu(_actnorm(F.conv2d(x, sd[p + ".2.weight"]), sd, p + ".2.actnorm."))
    return F.conv2d(x, sd[p + ".4.weight"], sd[p + ".4.bias"], padding=1) * torch.exp(3 * sd[p + ".4.logs"])


def _unsqueeze(x):
    b, c, h, w = x.shape
    return x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def _affine_inverse(z, sd, p, ft):
    """SRFlow CondAffineSeparatedAndCond decode with eps 1e-4; also returns min(scale)."""
    c = z.shape[1] // 2
    h = _subnet(torch.cat([z[:, :c], ft], 1), sd, p + "affine.fAffine")
    s = torch.sigmoid(h[:, 1::2] + 2) + 1e-4
    z = torch.cat([z[:, :c], z[:, c:] / s - h[:, 0::2]], 1)
    h = _subnet(ft, sd, p + "affine.fFeatures")
    s_f = torch.sigmoid(h[:, 1::2] + 2) + 1e-4
    return z / s_f - h[:, 0::2], min(s.min().item(), s_f.min().item())


def _reference_decode(sd, plan, hr=32, heat=0.9, seed=0):
    """Minimal SRFlow decode (random 320-ch conditioning) to check that synthetic values are sane."""
    gen = torch.Generator().manual_seed(seed)
    n = len(plan)
    z = heat * torch.randn(1, sd[f"{LAYER_PREFIX}{n - 1}.actnorm.bias"].shape[1],
                           hr >> plan.count("squeeze"), hr >> plan.count("squeeze"), generator=gen)
    min_scale = 1.0
    for i in reversed(range(n)):
        p = f"{LAYER_PREFIX}{i}."
        if plan[i] == "squeeze":
            z = _unsqueeze(z)
        elif plan[i] == "split":
            h = F.conv2d(z, sd[p + "conv.weight"], sd[p + "conv.bias"], padding=1) * torch.exp(3 * sd[p + "conv.logs"])
            eps = heat * torch.randn(h[:, 0::2].shape, generator=gen)
            z = torch.cat([z, h[:, 0::2] + torch.exp(h[:, 1::2]) * eps], 1)
        else:
            if plan[i] == "coupling":
                ft = torch.randn(1, 320, *z.shape[2:], generator=gen)
                z, s = _affine_inverse(z, sd, p, ft)
                min_scale = min(min_scale, s)
            w_inv = torch.linalg.inv(sd[p + "invconv.weight"].double()).float()
            z = F.conv2d(z, w_inv[:, :, None, None]) * torch.exp(-sd[p + "actnorm.logs"]) - sd[p + "actnorm.bias"]
    return z, min_scale


@torch.no_grad()
def test_synthetic_srflow_samples_stay_sane():
    entries = reduce_manifest(read_manifest("SRFlow_DF2K_4X"), nb=1, K=16)
    out, min_scale = _reference_decode(build_state_dict(entries, seed=0), layer_plan(entries))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert out.abs().max() < 10 and min_scale > 0.98


@torch.no_grad()
def test_untrained_scale_bias_explodes():
    """``affine_scale_bias=0`` (untrained init, scale ~ sigmoid(2)) blows up over 16 steps per level."""
    entries = reduce_manifest(read_manifest("SRFlow_DF2K_4X"), nb=1, K=16)
    out, min_scale = _reference_decode(build_state_dict(entries, seed=0, affine_scale_bias=0.0), layer_plan(entries))
    assert min_scale < 0.01
    assert not torch.isfinite(out).all() or out.abs().max() > 1e3
