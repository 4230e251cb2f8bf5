"""Exactness against outputs of the original SRFlow / NCSR / robustNF code (see tests/fixtures/reference/README.md).

Targets of the acceptance criteria: log_prob relative 1e-5, decode absolute 1e-4, identical per-level features.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import robustness_diag as rd
from tests.synth import build_state_dict, read_manifest, reduce_manifest, state_hash, write_variant

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "reference").glob("*.pt"))


@pytest.fixture(params=FIXTURES, ids=[p.stem for p in FIXTURES])
def case(request, tmp_path):
    fix = torch.load(request.param, weights_only=True)
    sd = build_state_dict(reduce_manifest(read_manifest(fix["manifest"]), **fix["reduce"]), seed=fix["seed"])
    if state_hash(sd) != fix["state_sha256"]:
        pytest.fail(f"{request.param.name}: tests/synth.py no longer rebuilds the weights the reference ran on "
                    "(generator or builder changed); regenerate the fixture")
    path = tmp_path / "weights.pth"
    write_variant(sd, path, "raw")
    return fix, path


def test_fixtures_present():
    assert len(FIXTURES) == 6


def test_log_prob_matches_reference(case):
    fix, path = case
    flow = rd.load_flow(path, config=fix["config"], residual=False)
    inp = fix["inputs"]
    with torch.no_grad():
        lp = flow.log_prob(inp["hr"], inp["lr"])
        latents, objective = flow.encode(inp["hr"], inp["lr"])
    torch.testing.assert_close(lp, fix["objective"], rtol=1e-5, atol=0)
    torch.testing.assert_close(objective, fix["objective"], rtol=1e-5, atol=0)
    for ours, ref in zip(latents, fix["encode_latents"], strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_decode_matches_reference(case):
    fix, path = case
    flow = rd.load_flow(path, config=fix["config"])
    inp = fix["inputs"]
    with torch.no_grad():
        heat0 = flow.decode(inp["lr"], heat=0.0)
        given = flow.decode(inp["lr"], latents=list(inp["latents"]))
    torch.testing.assert_close(heat0, fix["decode_heat0"], rtol=0, atol=1e-4)
    torch.testing.assert_close(given, fix["decode_latents"], rtol=0, atol=1e-4)


def test_features_match_reference(case):
    fix, path = case
    flow = rd.load_flow(path, config=fix["config"])
    with torch.no_grad():
        feats = flow.features(fix["inputs"]["lr"])
    ref = fix["features_b0_every8th_channel"]
    for name, ours in feats.items():
        torch.testing.assert_close(ours[0, ::8], ref[name], rtol=1e-5, atol=1e-5)


def test_residual_log_prob_is_density_of_hr(case):
    """For residual flows, log_prob(hr) is the objective of the residual hr - bicubic_up(lr) (a translation)."""
    fix, path = case
    flow = rd.load_flow(path, config=fix["config"], residual=True)
    inp = fix["inputs"]
    with torch.no_grad():
        lp = flow.log_prob(inp["hr"], inp["lr"])
        _, direct = flow.encode(inp["hr"] - flow.upsample(inp["lr"]), inp["lr"])
    torch.testing.assert_close(lp, direct, rtol=0, atol=0)
