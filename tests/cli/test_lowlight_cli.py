"""A low-light folder (darkened photos) through fit, score, sample and audit with an LLFlow checkpoint, with the
same outputs and error rules as SR; HCFlow through fit and score."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustness_diag.analyses.audit.verdict import VERDICTS
from robustness_diag.analyses.inputs import flat_name
from robustness_diag.cli.main import main
from robustness_diag.data.lowlight import darken
from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, load_photo, random_crops
from tests.cli.helpers import read_rows as _rows
from tests.cli.helpers import save_png as _save
from tests.synth import small_hcflow_checkpoint, small_llflow_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowlight")
    ckpt = small_llflow_checkpoint(root / "llflow.pth")
    fit, test = root / "fit", root / "test"
    fit.mkdir()
    test.mkdir()
    for i, x in enumerate(random_crops([load_photo(n) for n in TRAIN_PHOTOS], 3, 64,
                                       torch.Generator().manual_seed(1), augment=False)):
        _save(darken(x), fit / f"dark{i}.png")
    held = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 2, 64, torch.Generator().manual_seed(0),
                        augment=False)
    _save(darken(held[0]), test / "dark0.png")
    _save(darken(held[1])[:, :61, :45], test / "odd.png")            # not a multiple of 8: padded, cropped back
    _save(held[1], test / "bright.png")                                 # normal light: out of distribution
    (test / "broken.png").write_text("not an image")
    return root, ckpt


def test_lowlight_folder_is_scored_and_sampled(setup):
    root, ckpt = setup
    stats = root / "stats.safetensors"
    assert main(["fit", str(ckpt), "--images", str(root / "fit"), "--out", str(stats), "--no-progress"]) == 0
    rc = main(["score", str(ckpt), "--stats", str(stats), "--images", str(root / "test"), "--out",
               str(root / "score"), "--save-maps", "--no-progress"])
    assert rc == 1                                                      # broken.png failed, the rest went on
    rows = {r["path"]: r for r in _rows(root / "score" / "scores.csv")}
    assert rows["broken.png"]["status"] == "error" and "not a recognised image" in rows["broken.png"]["error"]
    assert all(rows[k]["status"] == "ok" and rows[k]["level"] == "fea_up2" for k in ("dark0.png", "odd.png"))
    assert float(rows["bright.png"]["mean"]) > float(rows["dark0.png"]["mean"])
    odd_map = root / "score" / "maps" / f"{flat_name('odd.png')}.fea_up2.npy"
    assert np.load(odd_map).shape == (31, 23)    # ceil(61/2) x ceil(45/2)

    rc = main(["sample", str(ckpt), "--images", str(root / "test"), "--out", str(root / "samp"), "--samples", "2",
               "--save-maps", "--no-progress"])
    assert rc == 1
    rows = {r["path"]: r for r in _rows(root / "samp" / "samples.csv")}
    assert rows["broken.png"]["status"] == "error"
    assert rows["odd.png"]["status"] == "ok" and int(rows["odd.png"]["samples"]) == 2
    assert float(rows["odd.png"]["heat"]) == 0.0                       # the checkpoint's own heat (LLFlow: 0)
    z = np.load(root / "samp" / "maps" / f"{flat_name('odd.png')}.npz")
    assert z["artifact_mask"].shape == (2, 61, 45)                       # scale 1: the input's own size
    assert np.isfinite(z["explosion"]).all()


def test_lowlight_audit_uses_darkened_inputs_and_the_flows_heat(setup, tmp_path):
    import analyses.audit as A

    root, ckpt = setup
    tiny = dict(images=2, lr_size=16, samples=2, levels=(3,), fit_images=3, attack_images=1, attack_steps=2,
                bootstrap=10)
    res = A.run(A.AuditConfig(checkpoints=[str(ckpt)], out=str(tmp_path / "audit"), progress=False, overrides=tiny))
    assert not res.failures
    m = res.summaries[0]
    assert m["family"] == "llflow" and m["heat"] == 0.0                 # LLFlow's reference output is heat 0
    assert {c["condition"] for c in m["conditions"]} >= {"clean", "noise3", "blur3", "jpeg3", "exposure3"}
    z = np.load(tmp_path / "audit" / "work" / "llflow.pth" / "cond_clean.npz")
    assert z["lr"].shape == (16, 16, 3) and z["lr"].max() <= 0.3 + 1e-6    # darkened by data.lowlight.darken
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["models"][0]["verdict"] in VERDICTS


def test_hcflow_checkpoint_is_fitted_and_scored(tmp_path):
    ckpt = small_hcflow_checkpoint(tmp_path / "hc.pth")
    lr = tmp_path / "lr"
    lr.mkdir()
    hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], 2, 80, torch.Generator().manual_seed(2), augment=False)
    for i, x in enumerate(torch.nn.functional.avg_pool2d(hr, 4)):
        _save(x, lr / f"lr{i}.png")
    stats = tmp_path / "st.safetensors"
    assert main(["fit", str(ckpt), "--images", str(lr), "--out", str(stats), "--level", "level0_condFlow",
                 "--level", "level1_condFlow", "--no-progress"]) == 0
    assert main(["score", str(ckpt), "--stats", str(stats), "--images", str(lr), "--out", str(tmp_path / "sc"),
                 "--save-maps", "--no-progress"]) == 0
    rows = _rows(tmp_path / "sc" / "scores.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert np.load(tmp_path / "sc" / "maps" / f"{flat_name('lr0.png')}.level0_condFlow.npy").shape == (40, 40)   # HR/2
    assert np.load(tmp_path / "sc" / "maps" / f"{flat_name('lr0.png')}.level1_condFlow.npy").shape == (20, 20)   # LR
