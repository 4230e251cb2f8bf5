"""Training: deterministic given the seed, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import csv

import torch

import robustness_diag as rd
from robustness_diag.flows.train import Recipe, train

TINY = dict(nf=8, nb=2, gc=4, blocks=[0, 1], cond_channels=24, hidden=8, K=1, residual=True, f_in=192)


def _recipe(steps, coupling="affine"):
    flow = dict(TINY, coupling=coupling, coupling_attr=coupling)
    return Recipe(name="tiny", flow=flow, steps=steps, batch=4, hr_patch=16, log_every=2, val_every=4,
                  ckpt_every=3, val_patches=4)


def test_training_is_deterministic_and_resumable(tmp_path):
    a = train(_recipe(6), tmp_path / "a", progress=False)
    b_dir = tmp_path / "b"
    assert train(_recipe(6), b_dir, progress=False, stop_at=3) is None   # interrupted after step 3
    b = train(_recipe(6), b_dir, progress=False)          # resumes from step 3
    fa, fb = rd.load_flow(a), rd.load_flow(b)
    for (k, va), vb in zip(fa.state_dict().items(), fb.state_dict().values()):
        assert torch.equal(va, vb), k
    rows = list(csv.DictReader(open(b_dir / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    prov = fa.info["provenance"]
    assert prov["recipe"]["seed"] == 0 and "val_bpd" in prov and "lr_psnr" in prov


def test_spline_recipe_trains_and_lowers_nll(tmp_path):
    path = train(_recipe(30, "rqspline"), tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    first, last = float(rows[0]["train_bpd"]), float(rows[-1]["train_bpd"])
    assert last < first
    assert rd.load_flow(path).config.coupling == "rqspline"
