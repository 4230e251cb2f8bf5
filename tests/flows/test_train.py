"""Training: deterministic given the seed, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import csv

import pytest
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


def test_ncsr_noise_conditioning_trains_the_std_branch(tmp_path):
    flow_fields = dict(TINY, family="ncsr", coupling="affine", coupling_attr="affine", std_channels=3, S=1)
    recipe = Recipe(name="ncsr", flow=flow_fields, steps=4, batch=4, hr_patch=16, log_every=2, val_every=4,
                    ckpt_every=4, val_patches=4, lr_noise=0.05)
    flow = rd.load_flow(train(recipe, tmp_path, progress=False))
    heads = [s.coupling.fAffine_std[4].weight for _, _, s in flow.coupling_steps()]
    assert all(h.abs().sum() > 0 for h in heads)   # zero-initialised head moved: the branch got gradients


def test_dequantised_recipe_adds_uniform_noise_and_reports_the_reference_nll(tmp_path):
    """dequant=32: the HR targets get U(-1/64, 1/64) noise (the training NLL changes from step 1), the LR and the
    validation patches do not (val_bpd is on clean patches), and val_nll_ref = 3 * val_bpd + log2(32) per HR
    pixel, SRFlow's convention; dequant=0 logs 3 * val_bpd."""
    import dataclasses
    import math

    from robustness_diag.flows.train import reference_nll
    base = _recipe(2)
    train(base, tmp_path / "base", progress=False)
    train(dataclasses.replace(base, dequant=32), tmp_path / "deq", progress=False)
    rb = list(csv.DictReader(open(tmp_path / "base" / "log.csv")))
    rq = list(csv.DictReader(open(tmp_path / "deq" / "log.csv")))
    assert float(rb[0]["train_bpd"]) != float(rq[0]["train_bpd"])
    for rows, extra in ((rb, 0.0), (rq, 5.0)):
        assert float(rows[-1]["val_nll_ref"]) == pytest.approx(3 * float(rows[-1]["val_bpd"]) + extra, abs=1e-9)
    assert reference_nll(-2.0, 3, 256) == -6.0 + math.log2(256) and reference_nll(-2.0, 3, 0) == -6.0


def test_study_recipes_load_and_differ_from_the_bundled_one_only_where_stated():
    """The study's recipes: today's recipe with other seeds, a dequantised one, a noise-conditioned one with the std
    branch; the architecture and the step budget are the bundled one's."""
    from pathlib import Path
    root = Path(rd.flows.loading.bundled_path("sr4x_affine")).parent / "recipes"
    study = sorted((root / "study").glob("*.yaml"))
    assert len(study) == 10
    for path in study:
        r = Recipe.from_yaml(path)
        coupling = r.name.split("_")[0]
        bundled = Recipe.from_yaml(root / f"sr4x_{coupling}.yaml")
        changed = {k for k in ("seed", "steps", "dequant", "lr_noise", "batch", "hr_patch", "lr", "milestones")
                   if getattr(r, k) != getattr(bundled, k)}
        flow_changed = {k for k in set(r.flow) | set(bundled.flow) if r.flow.get(k) != bundled.flow.get(k)}
        assert r.steps == 6000 and changed <= {"seed", "dequant", "lr_noise"}, path
        if "_noise_" in r.name:
            assert r.lr_noise == 0.05 and r.flow["std_channels"] == 3 and flow_changed <= {"std_channels", "S",
                                                                                          "family"}
        else:
            assert r.lr_noise == 0 and not flow_changed, path
        assert (r.dequant == 256) == ("_dequant_" in r.name), path


def _rows(path, column):
    return {int(r["step"]): float(r[column]) for r in csv.DictReader(open(path)) if r[column]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sr4x_affine", "sr4x_rqspline"])
def test_bundled_recipe_reproduces_its_logged_training_curve(tmp_path, name):
    """Shortened re-run of a bundled flow's recipe (first 500 of 6000 steps, same seed and schedule): the logged
    training NLL and the first validation NLL match the bundled training log within 2%. The full re-run is the
    command on the model card."""
    from pathlib import Path
    ckpt = Path(rd.flows.loading.bundled_path(name))
    recipe = Recipe.from_yaml(ckpt.parent / "recipes" / f"{name}.yaml")
    assert train(recipe, tmp_path, progress=False, stop_at=500) is None
    ours, logged = tmp_path / "log.csv", ckpt.parent / f"{name}_train_log.csv"
    for column, steps in (("train_bpd", (50, 100, 500)), ("val_bpd", (500,))):
        a, b = _rows(ours, column), _rows(logged, column)
        for step in steps:
            assert a[step] == pytest.approx(b[step], rel=0.02), (column, step)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["affine_dequant_seed0", "rqspline_noise_seed0", "affine_base_seed1"])
def test_study_recipe_reproduces_its_logged_training_curve(tmp_path, name):
    """The first 250 steps of a study recipe (checkpoints/recipes/study) against the log of its full-budget run
    (checkpoints/study/full6000/NAME/train_log.csv), or, for a recipe whose full run is not there, of its
    short-budget run (short1500: the learning rate first halves at step 750, so its first 250 steps are the full
    recipe's): logged training NLL within 2%."""
    from pathlib import Path
    root = Path(rd.flows.loading.bundled_path("sr4x_affine")).parent
    recipe = Recipe.from_yaml(root / "recipes" / "study" / f"{name}.yaml")
    assert train(recipe, tmp_path, progress=False, stop_at=250) is None
    a = _rows(tmp_path / "log.csv", "train_bpd")
    logged = root / "study" / "full6000" / name / "train_log.csv"
    b = _rows(logged if logged.exists() else root / "study" / "short1500" / name / "train_log.csv", "train_bpd")
    for step in (50, 100, 250):
        assert a[step] == pytest.approx(b[step], rel=0.02), step
