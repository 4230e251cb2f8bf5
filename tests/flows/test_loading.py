"""Loading synthetic checkpoints built independently from the original projects' key/shape manifests."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.errors import (ArchitectureMismatchError, NotACheckpointError, TrainingStateError,
                                          UnsafeCheckpointError, UnsupportedFlowError)
from tests.synth import build_state_dict, read_manifest, reduce_manifest, write_variant, write_yaml_config

# manifest -> (family, coupling, scale, frozen 1x1 conv, std channels)
SUPPORTED = {
    "SRFlow_DF2K_4X": ("srflow", "affine", 4, False, 0),
    "SRFlow_DF2K_8X": ("srflow", "affine", 8, False, 0),
    "SRFlow_CelebA_8X": ("srflow", "affine", 8, False, 0),
    "NCSR_4X": ("ncsr", "affine", 4, False, 3),
    "NCSR_8X": ("ncsr", "affine", 8, False, 3),
    "rNF_4X_RQs": ("robustnf", "rqspline", 4, True, 3),
    "rNF_4X_RQs_permtrain": ("robustnf", "rqspline", 4, False, 3),
    "rNF_8X_RQs": ("robustnf", "rqspline", 8, True, 3),
    "rNF_4X_AffReparam": ("robustnf", "affine_reparam", 4, False, 3),
}
FULL_FAST = {"SRFlow_DF2K_4X", "rNF_4X_RQs"}


def _write(tmp_path, name, reduced=True, kind="raw", seed=0, **kw):
    entries = read_manifest(name)
    if reduced:
        entries = reduce_manifest(entries, nb=5, K=2)
    sd = build_state_dict(entries, seed=seed)
    path = tmp_path / f"{name}_{kind}.pth"
    write_variant(sd, path, kind, **kw)
    return path, sd


def _check_loaded(flow, name, sd):
    family, coupling, scale, frozen, std = SUPPORTED[name]
    assert flow.config.family == family
    assert flow.config.coupling == coupling
    assert flow.config.scale == scale
    assert flow.config.frozen_invconv == frozen
    assert flow.config.std_channels == std
    assert list(flow.state_dict().keys()) == list(sd.keys())  # same keys, same order
    for k, v in sd.items():
        assert torch.equal(flow.state_dict()[k], v), k


def _finite_sample(flow):
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = flow.sample(lr, heat=0.9, generator=torch.Generator().manual_seed(2))
    assert x.shape == (2, 3, 8 * flow.config.scale, 8 * flow.config.scale)
    assert torch.isfinite(x).all()
    return x


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_reduced_manifest_layouts_load_and_sample(tmp_path, name):
    path, sd = _write(tmp_path, name)
    flow = rd.load_flow(path)
    _check_loaded(flow, name, sd)
    assert flow.config.K == [2] * flow.config.L and flow.config.nb == 5
    assert "blocks" in flow.info["defaulted"]
    _finite_sample(flow)


@pytest.mark.parametrize("name", sorted(FULL_FAST))
def test_full_size_manifest_layouts_load_and_sample(tmp_path, name):
    path, sd = _write(tmp_path, name, reduced=False)
    flow = rd.load_flow(path)
    _check_loaded(flow, name, sd)
    assert flow.config.blocks == [1, 8, 15, 22] and flow.info["sources"]["blocks"] == "defaulted"
    assert flow.config.K == [16] * 3
    _finite_sample(flow)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(SUPPORTED) - FULL_FAST))
def test_full_size_manifest_layouts_load_and_sample_slow(tmp_path, name):
    path, sd = _write(tmp_path, name, reduced=False)
    flow = rd.load_flow(path)
    _check_loaded(flow, name, sd)
    _finite_sample(flow)


def test_full_size_defaults_follow_the_reference_configs(tmp_path):
    """SRFlow 8X uses blocks [1,3,5,7] (DF2K/CelebA configs); NCSR 4X uses S = [0,16,16]."""
    p8, _ = _write(tmp_path, "SRFlow_DF2K_8X", reduced=False)
    assert rd.load_flow(p8).config.blocks == [1, 3, 5, 7]
    p4, _ = _write(tmp_path, "NCSR_4X", reduced=False)
    flow = rd.load_flow(p4)
    assert flow.config.S == [0, 16, 16] and flow.config.splits == [1]


@pytest.mark.parametrize("kind", ["module_prefix", "wrapped_state_dict", "wrapped_params_ema", "legacy"])
def test_container_variants_load_identically(tmp_path, kind):
    ref_path, sd = _write(tmp_path, "SRFlow_DF2K_4X", kind="raw")
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", kind=kind)
    a, b = rd.load_flow(ref_path), rd.load_flow(path)
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.decode(lr, heat=0.0), b.decode(lr, heat=0.0))
    if kind != "legacy":
        assert b.info["notes"], "the unwrapping/prefix stripping is reported"


def test_truncated_state_dict_names_missing_keys(tmp_path):
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", kind="truncated")
    with pytest.raises(ArchitectureMismatchError) as e:
        rd.load_flow(path)
    assert str(path) in str(e.value) and "SRFlow" in str(e.value)
    assert "flowUpsamplerNet.f.0.weight" in e.value.missing
    assert "missing keys" in str(e.value)


def test_4x_file_with_8x_yaml_reports_the_known_mismatch(tmp_path):
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", reduced=False)
    yml = tmp_path / "SRFlow_DF2K_8X.yml"
    write_yaml_config(yml, scale=8, network_G={"nb": 23, "flow": {"K": 16, "L": 4,
                                                                  "stackRRDB": {"blocks": [1, 3, 5, 7]}}})
    with pytest.raises(ArchitectureMismatchError) as e:
        rd.load_flow(path, config=yml)
    assert "RRDB.upconv3.weight" in e.value.missing
    assert any(k.startswith("flowUpsamplerNet.layers.58.") for k in e.value.missing)
    assert any(k.startswith("flowUpsamplerNet.layers.4") for k, _, _ in e.value.mismatched)


def test_training_state_is_refused(tmp_path):
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", kind="training_state")
    with pytest.raises(TrainingStateError, match="training-state"):
        rd.load_flow(path)


@pytest.mark.parametrize("kind", ["not_checkpoint", "truncated_file"])
def test_unreadable_files_are_refused(tmp_path, kind):
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", kind=kind)
    with pytest.raises(NotACheckpointError) as e:
        rd.load_flow(path)
    assert str(path) in str(e.value)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path, _ = _write(tmp_path, "SRFlow_DF2K_4X", kind="malicious_pickle", marker=marker)
    with pytest.raises(UnsafeCheckpointError, match="not executed"):
        rd.load_flow(path)
    assert not marker.exists()


# HCFlow and LLFlow became supported with issue 8 (tests/flows/test_hcflow.py, test_llflow.py).
@pytest.mark.parametrize("name,family", [("rNF_4X_Bspline", "robustnf"), ("SRFlow-DA_DF2K_4X", "srflow-da")])
def test_recognised_but_unsupported_families(tmp_path, name, family):
    sd = build_state_dict(read_manifest(name), seed=0)
    path = tmp_path / f"{name}.pth"
    write_variant(sd, path, "raw")
    with pytest.raises(UnsupportedFlowError) as e:
        rd.load_flow(path)
    assert f"family {family}" in str(e.value)


def test_yaml_overrides_are_recorded(tmp_path):
    path, _ = _write(tmp_path, "NCSR_4X")
    yml = tmp_path / "4X.yml"
    write_yaml_config(yml, scale=4, network_G={"nb": 5, "flow": {"K": 2, "L": 3, "S": [0, 1, 2],
                                                                 "stackRRDB": {"blocks": [0, 1, 3, 4]}}})
    flow = rd.load_flow(path, config=yml)
    assert flow.config.blocks == [0, 1, 3, 4] and flow.info["sources"]["blocks"] == "config"
    assert flow.config.S == [0, 1, 2] and flow.info["sources"]["S"] == "config"
    flagged = [s.coupling.use_std for _, _, s in flow.coupling_steps()]
    assert flagged == [False, False, False, True, True, True]


def test_std_steps_recovered_from_untouched_weights(tmp_path):
    entries = reduce_manifest(read_manifest("NCSR_4X"), nb=5, K=2)
    sd = build_state_dict(entries, seed=0)
    for k in sd:  # level 1 (layers 3-4): std branch never ran -> still at its init
        if ".fAffine_std." in k and k.split(".")[2] in ("3", "4") and (".4." in k or ".0.actnorm." in k):
            sd[k].zero_()
    path = tmp_path / "ncsr.pth"
    write_variant(sd, path, "raw")
    flow = rd.load_flow(path)
    assert flow.config.S == [0, 2, 2] and flow.info["sources"]["S"] == "heuristic"


def test_own_safetensors_round_trip(tmp_path):
    path, _ = _write(tmp_path, "rNF_4X_RQs")
    flow = rd.load_flow(path)
    out = rd.save_flow(flow, tmp_path / "own.safetensors", provenance={"seed": 3})
    again = rd.load_flow(out)
    assert again.config == flow.config and again.info["provenance"] == {"seed": 3}
    lr = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(flow.decode(lr, heat=0.0), again.decode(lr, heat=0.0))


def test_batch_elements_are_independent_with_std_branch(tmp_path):
    """The reference std branch only broadcast for batch 1; here a batch equals its elements run one by one."""
    flow = rd.load_flow(_write(tmp_path, "NCSR_4X")[0])
    g = torch.Generator().manual_seed(0)
    lr, hr = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        lat = flow.draw_latents(lr, 0.9, torch.Generator().manual_seed(1))
        batch = flow.decode(lr, latents=lat)
        single = torch.cat([flow.decode(lr[i:i + 1], latents=[t[i:i + 1] for t in lat]) for i in range(3)])
        lp = flow.log_prob(hr, lr)
        lp1 = torch.cat([flow.log_prob(hr[i:i + 1], lr[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, lp1, rtol=1e-5, atol=1e-3)


def test_float64_matches_float32(tmp_path):
    flow = rd.load_flow(_write(tmp_path, "rNF_4X_AffReparam")[0])
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        x32 = flow.decode(lr, heat=0.0)
        x64 = flow.double().decode(lr.double(), heat=0.0)
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), x32, rtol=1e-4, atol=1e-4)


def test_odd_lr_size_is_a_clear_error(tmp_path):
    flow = rd.load_flow(_write(tmp_path, "SRFlow_DF2K_4X")[0])
    with pytest.raises(ValueError, match="not divisible"):
        flow.decode(torch.rand(1, 3, 7, 8), heat=0.0)


def test_weights_digest_is_stable_across_dtype_and_changes_with_weights():
    import robustness_diag as rd
    flow = rd.load_flow("bundled:sr4x_affine")
    d = rd.weights_digest(flow)
    assert len(d) == 64 and rd.weights_digest(flow.double()) == d
    with torch.no_grad():
        next(flow.parameters()).view(-1)[0] += 1e-3
    assert rd.weights_digest(flow) != d
