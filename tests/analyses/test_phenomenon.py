"""The phenomenon measurement: criterion, slope tracking and outputs, on tiny flows with known behaviour."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import robustness_diag as rd
from robustness_diag.analyses.phenomenon import PhenomenonConfig, measure, run
from robustness_diag.flows.config import FlowConfig
from robustness_diag.flows.layers import Conv2dZeros
from robustness_diag.flows.synthetic import randomize_flow

TINY = dict(nf=8, nb=2, gc=4, blocks=[0, 1], cond_channels=24, hidden=8, K=1, f_in=192, residual=True)


def _flow(coupling="affine"):
    return randomize_flow(rd.build_flow(FlowConfig(coupling=coupling, coupling_attr=coupling, **TINY)), seed=0)


def test_forced_exploding_inverse_is_measured():
    flow = _flow()
    with torch.no_grad():
        for m in flow.flowUpsamplerNet.modules():
            if isinstance(m, Conv2dZeros) and m.bias.shape[0] % 2 == 0 and m.weight.shape[1] == 8:
                m.bias[1::2] = -60.0   # scale raw -> sigmoid(-58) ~ 0: scale = eps, inverse slope 1/eps
    cfg = PhenomenonConfig(flows=[], samples=2)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    r = measure(flow, lr, cfg, seed=0)
    assert r["max_inverse_slope"] == pytest.approx(1e4, rel=1e-3)
    assert r["frac_samples_with_artifact"] == 1.0 and r["frac_artifact_pixels"] > 0.5


def test_clean_flow_has_no_artifacts_and_counts_add_up():
    flow = _flow("rqspline")
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    r = measure(flow, lr, PhenomenonConfig(flows=[], samples=3), seed=0)
    assert r["samples"] == 6 and r["frac_artifact_pixels"] == 0.0 and r["frac_nan_pixels"] == 0.0
    assert 1.0 <= r["max_inverse_slope"] < 1e4 and math.isfinite(r["max_inverse_slope"])


def test_run_writes_one_row_per_flow_and_condition(tmp_path):
    paths = []
    for c in ("affine", "rqspline"):
        paths.append(rd.save_flow(_flow(c), tmp_path / f"{c}.safetensors"))
    res = run(PhenomenonConfig(flows=[str(p) for p in paths], out=str(tmp_path / "out"), images=2, lr_size=8,
                               samples=1, levels=[3]))
    rows = res.rows
    names = ["clean", "noise3", "blur3", "jpeg3", "exposure3", "graphics"]
    assert [r["condition"] for r in rows] == names * 2
    on_disk = list(csv.DictReader(open(tmp_path / "out" / "phenomenon.csv")))
    assert len(on_disk) == 12 and (tmp_path / "out" / "phenomenon.json").exists()
    assert [r["condition"] for r in on_disk] == names * 2
    assert res.paths == {"csv": tmp_path / "out" / "phenomenon.csv", "json": tmp_path / "out" / "phenomenon.json"}
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_model_card_lists_provenance_and_rates(tmp_path):
    from robustness_diag.analyses.model_card import card_text
    path = rd.save_flow(_flow("rqspline"), tmp_path / "f.safetensors",
                        provenance={"recipe": {"name": "tiny", "steps": 7, "seed": 3}, "val_bpd": -1.25,
                                    "lr_psnr": 30.5})
    out = tmp_path / "out"
    run(PhenomenonConfig(flows=[str(path)], out=str(out), images=1, lr_size=8, samples=1, levels=[1]))
    import json
    text = card_text(rd.load_flow(path), json.loads((out / "phenomenon.json").read_text()), str(path))
    assert "# tiny" in text and "-1.2500 bits/dim" in text and "30.50 dB" in text and "7 steps" in text
    assert text.count("\n| ") == 7  # header + 6 conditions
