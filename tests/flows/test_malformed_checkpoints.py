"""Malformed checkpoint files: every one is a :class:`CheckpointError` naming the file and the reason, never another
exception; sizes inferred from key patterns or headers are checked against sane limits before anything is built."""
from __future__ import annotations

import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.config import FlowConfig, HCFlowConfig
from robustness_diag.flows.errors import CheckpointError, MalformedCheckpointError, NotACheckpointError, \
    internal_error
from robustness_diag.flows.recognition import (implausible_sizes, infer_architecture,
                                               infer_hcflow_config, parameter_estimate, recognize_family)
from tests.malformed import BAD, write_bad
from tests.ood.helpers import tiny_flow
from tests.synth import count_params, manifest_names, read_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, own .safetensors, raw state_dict)`` of the tiny seeded flow."""
    d = tmp_path_factory.mktemp("tiny")
    flow = tiny_flow()
    return d, rd.save_flow(flow, d / "tiny.safetensors"), {k: v.clone() for k, v in flow.state_dict().items()}


@pytest.mark.parametrize("kind", BAD)
def test_malformed_file_is_a_checkpoint_error_naming_file_and_reason(tiny, tmp_path, kind):
    _, own, state = tiny
    path, words = write_bad(kind, tmp_path, own, state)
    with pytest.raises(CheckpointError) as ei:
        rd.load_flow(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and ei.value.path == str(path)
    assert all(w in msg for w in words), msg


def test_pth_renamed_safetensors_is_read_by_its_content(tiny, tmp_path):
    _, _, state = tiny
    path = tmp_path / "renamed.safetensors"
    torch.save(state, path)
    flow = rd.load_flow(path)
    assert flow.info["format"] == "torch-zip" and flow.config.nf == 4


def test_absurd_sizes_are_refused_before_building(tiny, tmp_path, monkeypatch):
    from robustness_diag.flows import loading
    built = []
    monkeypatch.setattr(loading, "model_for_config", lambda cfg: built.append(cfg) or 1 / 0)
    _, own, state = tiny
    for kind in ("extra_layer_40", "absurd_width", "absurd_header"):
        path, _ = write_bad(kind, tmp_path, own, state)
        with pytest.raises(MalformedCheckpointError, match="refused before building"):
            rd.load_flow(path)
    assert built == []


def test_unforeseen_interpretation_failure_is_still_a_checkpoint_error(tiny, tmp_path, monkeypatch):
    from robustness_diag.flows import loading

    def boom(*a, **k):
        raise IndexError("list index out of range")

    monkeypatch.setattr(loading, "infer_architecture", boom)
    path = tmp_path / "tiny.pth"
    torch.save(tiny[2], path)
    with pytest.raises(MalformedCheckpointError, match="IndexError: list index out of range") as ei:
        rd.load_flow(path)
    assert str(ei.value).startswith(str(path))


def test_internal_error_text():
    assert internal_error(ZeroDivisionError("division by zero\nmore")) == \
        "internal error: ZeroDivisionError: division by zero"
    assert internal_error(KeyError()) == "internal error: KeyError"


def test_not_a_checkpoint_error_keeps_its_path_and_reason():
    e = NotACheckpointError("reason").with_path("a.pth")
    assert str(e) == "a.pth: reason" and e.path == "a.pth" and e.reason == "reason"
    assert str(NotACheckpointError("r", "b.pth").with_path("c.pth")) == "b.pth: r"


# -- the limits never refuse a published architecture ------------------------------------------------------------------

@pytest.mark.parametrize("name", manifest_names())
def test_published_layouts_are_within_the_limits(name):
    state = {k: torch.empty(s, device="meta") for k, s in read_manifest(name)}
    rec = recognize_family(state)
    if rec.family == "hcflow":
        fields, _ = infer_hcflow_config(state)
    elif rec.family in ("unknown", "rrdb-encoder"):
        pytest.skip(rec.variant)
    else:
        fields, _ = infer_architecture(state, rec)
    assert implausible_sizes(fields) == [], name


def _hcflow_config(manifest: str) -> HCFlowConfig:
    state = {k: torch.empty(s, device="meta") for k, s in read_manifest(manifest)}
    fields, _ = infer_hcflow_config(state)
    return HCFlowConfig.from_dict(fields)


@pytest.mark.parametrize("cfg,manifest", [
    (lambda: FlowConfig(), "SRFlow_DF2K_4X"),
    (lambda: FlowConfig(scale=8, L=4, K=16, blocks=[1, 3, 5, 7], f_out=48), "SRFlow_DF2K_8X"),
    (lambda: _hcflow_config("SR_DF2K_4X_HCFlow"), "SR_DF2K_4X_HCFlow"),
    (lambda: _hcflow_config("SR_CelebA_8X_HCFlow"), "SR_CelebA_8X_HCFlow"),
])
def test_parameter_estimate_is_a_lower_bound_of_published_flows(cfg, manifest):
    cfg = cfg()
    assert implausible_sizes(cfg) == []
    assert 0 < parameter_estimate(cfg) <= count_params(read_manifest(manifest))


def test_limits_name_each_absurd_size():
    bad = implausible_sizes({"L": 60, "nf": 10 ** 7, "K": [2, -1], "nb": 3.5, "hidden": 64})
    text = "; ".join(bad)
    assert "L=60" in text and "nf=10000000" in text and "K=[2, -1]" in text and "nb=3.5" in text
    assert "hidden" not in text
    assert any("parameters" in p for p in implausible_sizes(FlowConfig(nf=4096, gc=4096, cond_channels=4096)))
