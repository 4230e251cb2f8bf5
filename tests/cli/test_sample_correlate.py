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


@pytest.fixture(scope="module")
def stats(folders):
    path = folders / "stats.safetensors"
    assert main(["fit", "bundled:sr4x_affine", "--images", str(folders / "fit"), "--out", str(path),
                 "--no-progress"]) == 0
    return path


def _score(folders, stats, name, maps):
    out = folders / name
    if not (out / "scores.csv").is_file():
        main(["score", "bundled:sr4x_affine", "--stats", str(stats), "--images", str(folders / "lr"), "--out",
              str(out), "--no-progress"] + (["--save-maps"] if maps else []))
    return out


def _sample(folders, name, maps):
    out = folders / name
    if not (out / "samples.csv").is_file():
        main(["sample", "bundled:sr4x_affine", "--images", str(folders / "lr"), "--out", str(out), "--samples", "3",
              "--no-progress"] + (["--save-maps"] if maps else []))
    return out


def _strict_json(path):
    def refuse(c):
        raise ValueError(f"{path}: non-standard JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _sklearn_image_auroc(score_dir, sample_dir):
    """The image-level AUROC computed independently: scores.csv 'mean' vs samples.csv 'samples_with_artifacts'."""
    from sklearn.metrics import roc_auc_score
    scores = {r["path"]: float(r["mean"]) for r in _rows(score_dir / "scores.csv") if r["status"] == "ok"}
    flagged = {r["path"]: int(r["samples_with_artifacts"]) > 0 for r in _rows(sample_dir / "samples.csv")
               if r["status"] == "ok"}
    keys = [k for k in scores if k in flagged]
    return roc_auc_score([flagged[k] for k in keys], [scores[k] for k in keys]), len(keys)


def test_correlate_joins_score_and_sample_folders(folders, stats):
    score, samp = _score(folders, stats, "score", maps=True), _sample(folders, "samp", maps=True)
    out = folders / "corr"
    assert main(["correlate", str(samp), str(score), "--out", str(out), "--bootstrap", "50"]) == 0
    m = _strict_json(out / "metrics.json")["models"]["sr4x_affine"]
    assert m["n_images"] == 5                                        # the broken file is in neither join
    assert m["n_trials"] == 3 * m["n_positions"]
    # with maps: the image level and the gate beside the per-position statistics
    auroc, n = _sklearn_image_auroc(score, samp)
    assert m["image_level"]["n_images"] == n == 5 and m["image_level"]["auroc"]["value"] == pytest.approx(auroc)
    assert "gate" in m and "within_image" in m and "per_position_unavailable" not in m
    assert {r["name"] for r in m["per_image"]} == {"clean0.png", "clean1.png", "noise0.png", "noise1.png", "odd.png"}
    assert (out / "report.html").is_file() and (out / "examples.png").is_file()
    assert (out / "reliability.png").is_file() and (out / "per_image.png").is_file()
    _strict_json(out / "report_data.json")
    # a folder without its partner is refused with the reason
    assert main(["correlate", str(samp), "--out", str(folders / "c2")]) == 2


def test_correlate_without_maps_gives_the_image_level(folders, stats, capsys):
    """Folders made without --save-maps: image-level statistics and the gate, a report, exit code 0; the missing
    per-position analysis is said once."""
    score, samp = _score(folders, stats, "score_nomaps", maps=False), _sample(folders, "samp_nomaps", maps=False)
    assert not (score / "maps").exists() and not (samp / "maps").exists()
    out = folders / "corr_nomaps"
    out.mkdir()
    for stale in ("reliability.png", "roc_pr.csv", "examples.png"):   # figures of an earlier run with maps
        (out / stale).write_bytes(b"old")
    capsys.readouterr()
    assert main(["correlate", str(score), str(samp), "--out", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if "per-position statistics not available" in line]) == 1
    m = _strict_json(out / "metrics.json")["models"]["sr4x_affine"]
    assert "--save-maps" in m["per_position_unavailable"] and "auroc" not in m
    auroc, n = _sklearn_image_auroc(score, samp)
    il = m["image_level"]
    assert il["n_images"] == n == 5 and il["n_sources"] == 5 and il["n_positive_images"] >= 1
    assert il["auroc"]["value"] == pytest.approx(auroc)
    assert m["gate"]["false_alarm_target"] == 0.05 and len(m["per_image"]) == 5
    data = _strict_json(out / "report_data.json")
    assert data["histograms"] == {}
    html = (out / "report.html").read_text()
    assert "per-position analysis not available" in html and "Image level: AUROC" in html
    assert (out / "per_image.png").is_file() and not (out / "reliability.png").exists()
    assert not (out / "roc_pr.csv").exists() and not (out / "examples.png").exists()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


def test_correlate_with_maps_for_some_images_or_one_run(folders, stats, tmp_path, capsys):
    """Maps for some images: per-position statistics on those, the image level on all. Maps in one run only: the
    image level, with the reason naming the run without maps."""
    import shutil

    from robustness_diag.analyses import correlate as C
    score, samp = _score(folders, stats, "score", maps=True), _sample(folders, "samp", maps=True)
    partial = tmp_path / "score"
    shutil.copytree(score, partial)
    for f in (partial / "maps").glob(f"{flat_name('odd.png')}.*"):
        f.unlink()
    capsys.readouterr()
    assert main(["correlate", str(partial), str(samp), "--out", str(tmp_path / "corr"), "--bootstrap", "20"]) == 0
    assert "per-position statistics on 4 of 5 images" in capsys.readouterr().out
    m = _strict_json(tmp_path / "corr" / "metrics.json")["models"]["sr4x_affine"]
    assert m["n_images"] == 4 and m["image_level"]["n_images"] == 5
    (r,) = C.results_from_run_dirs([score, _sample(folders, "samp_nomaps", maps=False)])
    assert r.obs is None and r.images.score.size == 5 and r.join["maps_missing"] == 5 and not r.left_out
    assert "'sample' run" in r.positions_unavailable and "'score' run" not in r.positions_unavailable
