"""The bundled flows load from package data and their model cards state their own provenance numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import robustness_diag as rd
from robustness_diag.data.photos import downscale, load_photo

NAMES = {"sr4x_affine": "affine", "sr4x_rqspline": "rqspline"}


@pytest.mark.parametrize("name,coupling", sorted(NAMES.items()))
def test_bundled_flow_loads_and_samples(name, coupling):
    flow = rd.load_flow(f"bundled:{name}")
    assert flow.config.coupling == coupling and flow.config.residual
    path = Path(flow.info["path"])
    assert path.stat().st_size < 20 * 2 ** 20
    prov = flow.info["provenance"]
    assert prov["recipe"]["name"] == name and prov["recipe"]["seed"] == 0
    card = path.with_suffix(".md").read_text()
    assert f"{prov['val_bpd']:.4f} bits/dim" in card and f"{prov['lr_psnr']:.2f} dB" in card
    lr = downscale(load_photo("chelsea")[None, :, 100:164, 200:264], 4)   # held-out photo
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))   # far out of distribution
    with torch.no_grad():
        clean = flow.sample(lr, generator=torch.Generator().manual_seed(1))
        ood = flow.sample(noise, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(clean).all() and clean.min() > -0.5 and clean.max() < 1.5
    # the exploding inverse on a pure-noise condition: NaN for the affine flow, finite for the spline flow
    assert bool(torch.isfinite(ood).all()) == (coupling == "rqspline")


def test_bundled_flows_share_the_architecture_except_the_coupling():
    a, b = (rd.load_flow(f"bundled:{n}").config.to_dict() for n in NAMES)
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"family", "coupling", "coupling_attr"}


def test_unknown_bundled_name_lists_the_available_ones():
    with pytest.raises(rd.CheckpointError, match="sr4x_affine"):
        rd.load_flow("bundled:nope")


@pytest.mark.parametrize("name", sorted(NAMES))
def test_model_card_rates_are_reproduced_by_the_measurement(name):
    """Re-measures four of the card's conditions with the card's settings (seeded, so exactly)."""
    from robustness_diag.analyses.phenomenon import PhenomenonConfig, conditions, measure
    from robustness_diag.data.photos import VALIDATION_PHOTOS, load_photo, random_crops
    flow = rd.load_flow(f"bundled:{name}")
    card = Path(flow.info["path"]).with_suffix(".md").read_text()
    # columns: condition, samples with artifacts, flagged k/n [interval], artifact px, NaN px, max inverse slope
    table = {cells[1].strip(): [cells[i].strip() for i in (2, 4, 5, 6)]
             for cells in (line.split("|") for line in card.split("## Across seeds")[0].splitlines()
                           if line.startswith("| ") and not line.startswith("| condition"))}
    cfg = PhenomenonConfig(flows=[], images=8, lr_size=16, samples=4)
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], cfg.images, cfg.lr_size * 4,
                      torch.Generator().manual_seed(cfg.seed), augment=False)
    conds = conditions(hr, 4, cfg)
    for cond in ("clean", "noise1", "exposure2", "graphics"):
        r = measure(flow, conds[cond], cfg, cfg.seed)
        want = [float(v) for v in table[cond]]
        # Seeded, so equal on one machine; thread counts may move values at the 1.5/-0.5 thresholds slightly.
        assert r["frac_samples_with_artifact"] == pytest.approx(want[0], abs=0.05), cond
        assert r["frac_artifact_pixels"] == pytest.approx(want[1], abs=0.01), cond
        assert r["frac_nan_pixels"] == pytest.approx(want[2], abs=0.01), cond
        assert r["max_inverse_slope"] == pytest.approx(want[3], rel=0.05), cond
