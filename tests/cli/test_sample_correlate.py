"""`sample` on a folder (rows, maps, bad files, resume, determinism) and `correlate` on score + sample folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustness_diag.analyses.inputs import flat_name
from robustness_diag.cli.main import main
from robustness_diag.data import degradations as deg
from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, downscale, load_photo, random_crops
from tests.cli.helpers import read_rows as _rows
from tests.cli.helpers import save_png as _save


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    fit, lr_dir = root / "fit", root / "lr"
    fit.mkdir()
    lr_dir.mkdir()
    hr = random_crops([load_photo(n) for n in TRAIN_PHOTOS], 4, 96, torch.Generator().manual_seed(1), augment=False)
    for i, x in enumerate(downscale(hr, 4)):
        _save(x, fit / f"t{i}.png")
    hr = random_crops([load_photo(n) for n in VALIDATION_PHOTOS], 2, 56, torch.Generator().manual_seed(0),
                      augment=False)
    lr = downscale(hr, 4)                                            # 14 x 14: odd after /4 padding rules? even
    for i, x in enumerate(lr):
        _save(x, lr_dir / f"clean{i}.png")
    for i, x in enumerate(deg.add_noise(lr, 2, torch.Generator().manual_seed(0))):
        _save(x, lr_dir / f"noise{i}.png")
    _save(lr[0][:, :13, :11], lr_dir / "odd.png")                   # odd LR size: padded and cropped back
    (lr_dir / "broken.png").write_text("not an image")
    return root


def test_sample_writes_rows_maps_and_reports_bad_files(folders):
    out = folders / "samp"
    rc = main(["sample", "bundled:sr4x_affine", "--images", str(folders / "lr"), "--out", str(out), "--samples", "3",
               "--save-maps", "--save-samples", "--no-progress"])
    assert rc == 1                                                   # broken.png failed, the rest went on
    rows = {r["path"]: r for r in _rows(out / "samples.csv")}
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["error"]
    assert all(rows[k]["status"] == "ok" for k in ("clean0.png", "noise0.png", "odd.png"))
    detail = _rows(out / "sample_rows.csv")
    assert len(detail) == 3 * 5 and {d["sample"] for d in detail} == {"0", "1", "2"}
    assert int(rows["clean0.png"]["samples_with_artifacts"]) == 0
    assert int(rows["noise0.png"]["samples_with_artifacts"]) + int(rows["noise1.png"]["samples_with_artifacts"]) > 0
    z = np.load(out / "maps" / f"{flat_name('odd.png')}.npz")
    assert z["artifact_mask"].shape == (3, 52, 44) and z["events_lr"].shape == (13, 11)   # cropped back
    noisy = np.load(out / "maps" / f"{flat_name('noise0.png')}.npz")
    assert noisy["events_lr"].max() <= 3 and noisy["artifact_mask"].dtype == bool
    assert str(noisy["source"]) == "noise0.png"                      # the image recorded in its maps
    assert (out / "maps" / f"{flat_name('noise0.png')}.explosion.png").is_file()
    assert (out / "samples" / f"{flat_name('clean0.png')}.s02.png").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint"]["weights_digest"] and info["counts"]
    # resume: nothing redone; per-image seeds make a fresh run identical
    assert main(["sample", "bundled:sr4x_affine", "--images", str(folders / "lr"), "--out", str(out), "--samples",
                 "3", "--resume", "--no-progress"]) == 1
    assert len(_rows(out / "sample_rows.csv")) == 15
    again = folders / "samp2"
    main(["sample", "bundled:sr4x_affine", "--images", str(folders / "lr" / "noise0.png"), "--out", str(again),
          "--samples", "3", "--no-progress"])
    a = [r for r in detail if r["path"] == "noise0.png"]
    b = _rows(again / "sample_rows.csv")
    assert [r["artifact_pixels"] for r in a] == [r["artifact_pixels"] for r in b]


def test_sample_usage_errors(folders, tmp_path):
    assert main(["sample", str(tmp_path / "missing.pth"), "--images", str(folders / "lr"), "--out",
                 str(tmp_path / "o")]) == 2
    assert main(["sample", "bundled:sr4x_affine", "--images", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2


def test_correlate_joins_score_and_sample_folders(folders):
    stats, score = folders / "stats.safetensors", folders / "score"
    assert main(["fit", "bundled:sr4x_affine", "--images", str(folders / "fit"), "--out", str(stats),
                 "--no-progress"]) == 0
    main(["score", "bundled:sr4x_affine", "--stats", str(stats), "--images", str(folders / "lr"), "--out",
          str(score), "--save-maps", "--no-progress"])
    samp = folders / "samp"
    if not (samp / "samples.csv").is_file():
        main(["sample", "bundled:sr4x_affine", "--images", str(folders / "lr"), "--out", str(samp), "--samples",
              "3", "--save-maps", "--no-progress"])
    out = folders / "corr"
    assert main(["correlate", str(samp), str(score), "--out", str(out), "--bootstrap", "50"]) == 0
    m = json.loads((out / "metrics.json").read_text())["models"]["sr4x_affine"]
    assert m["n_images"] == 5                                        # the broken file is in neither join
    assert m["n_trials"] == 3 * m["n_positions"]
    assert (out / "report.html").is_file() and (out / "examples.png").is_file()
    # a folder without its partner is refused with the reason
    assert main(["correlate", str(samp), "--out", str(folders / "c2")]) == 2
