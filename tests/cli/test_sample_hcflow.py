"""`sample` on a synthetic HCFlow checkpoint: rows, per-sample rows and maps, finite values, odd LR sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from robustness_diag.analyses.inputs import flat_name
from robustness_diag.cli.main import main
from robustness_diag.flows.hcflow import MAX_LOG_SCALE
from tests.cli.helpers import read_rows as _rows
from tests.synth import small_hcflow_checkpoint

SIZES = {"a.png": (8, 8), "b.png": (9, 11), "c.png": (12, 10)}      # LR (h, w); HCFlow needs no padding


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_hcflow")
    ckpt = small_hcflow_checkpoint(root / "hc4x.pth")
    images = root / "lr"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(images / name)
    return ckpt, images, root


def test_sample_command_on_hcflow_writes_rows_and_finite_maps(setup):
    ckpt, images, root = setup
    out = root / "out"
    rc = main(["sample", str(ckpt), "--images", str(images), "--out", str(out), "--samples", "2", "--save-maps",
               "--save-samples", "--no-progress"])
    assert rc == 0
    rows = {r["path"]: r for r in _rows(out / "samples.csv")}
    assert set(rows) == set(SIZES) and all(r["status"] == "ok" for r in rows.values())
    for name, (h, w) in SIZES.items():
        r = rows[name]
        assert (int(r["lr_height"]), int(r["lr_width"]), int(r["samples"])) == (h, w, 2)
        assert 1.0 / 1.65 < float(r["max_inverse_slope"]) < 1.65               # the atan coupling bound
        assert np.isfinite(float(r["explosion_map_max"])) and 0.0 <= float(r["artifact_fraction_mean"]) <= 1.0
        z = np.load(out / "maps" / f"{flat_name(name)}.npz")
        assert z["artifact_mask"].shape == (2, 4 * h, 4 * w) and z["explosion"].shape == (2, 4 * h, 4 * w)
        assert np.isfinite(z["explosion"]).all() and z["events_lr"].shape == (h, w)
        assert (z["attribution"] >= -1).all() and int(z["artifact_mask"].sum()) == sum(
            int(d["artifact_pixels"]) for d in _rows(out / "sample_rows.csv") if d["path"] == name)
        assert (out / "samples" / f"{flat_name(name)}.s01.png").is_file()
    detail = _rows(out / "sample_rows.csv")
    assert len(detail) == 2 * len(SIZES) and {d["sample"] for d in detail} == {"0", "1"}
    for d in detail:
        assert float(d["max_log_inverse_slope"]) < MAX_LOG_SCALE and np.isfinite(float(d["explosion_map_max"]))
        assert int(d["nan_pixels"]) == 0 and int(d["first_exploding_layer"]) >= -1
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint"]["family"] == "hcflow" and info["checkpoint"]["coupling"] == "affine_atan"
    # per-image seeds: a second run of one image gives the same per-sample rows
    again = root / "again"
    assert main(["sample", str(ckpt), "--images", str(images / "b.png"), "--out", str(again), "--samples", "2",
                 "--no-progress"]) == 0
    keys = ("artifact_pixels", "max_log_inverse_slope", "explosion_map_max")
    assert [[d[k] for k in keys] for d in detail if d["path"] == "b.png"] == \
        [[d[k] for k in keys] for d in _rows(again / "sample_rows.csv")]
