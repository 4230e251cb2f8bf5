"""The per-position threshold calibrated on images held out of the fit; old statistics files fall back to chi."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import robustness_diag as rd
from robustness_diag.analyses.folder_run import read_table
from robustness_diag.cli.main import main
from robustness_diag.ood import (DEFAULT_BORDER_MARGIN, FeatureExtractor, MahalanobisScorer, chi_quantile, held_out,
                                 interior_mask)
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 14 + i, 16, generator=g) for i in range(n)]


def test_held_out_choice():
    assert [i for i in range(11) if held_out(i, 0.2)] == [0, 5, 10]
    assert [i for i in range(6) if held_out(i, 0.5)] == [0, 2, 4]
    assert [i for i in range(7) if held_out(i, 1 / 3)] == [0, 3, 6]
    assert not any(held_out(i, 0) for i in range(20))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        held_out(0, 1.0)


def test_calibrated_threshold_is_stored_and_used():
    flow = tiny_flow()
    imgs = _images(6)
    sc = rd.ood.fit_flow(flow, imgs)
    assert sc.meta["n_images"] == 4 and sc.meta["pixel_count"]["fea_up1"] == sum(
        im.shape[-2] * im.shape[-1] for i, im in enumerate(imgs) if i not in (0, 5))
    ex = FeatureExtractor(flow)
    held = [ex.distance_maps(imgs[i], sc)["fea_up1"].numpy() for i in (0, 5)]
    vals = np.concatenate([m[interior_mask(*m.shape, DEFAULT_BORDER_MARGIN)] for m in held]).astype(np.float64)
    cal = sc.meta["threshold_calibration"]
    lv = cal["levels"]["fea_up1"]
    assert cal["status"] == "calibrated" and cal["held_out"] == [0, 5] and cal["fraction"] == 0.2
    assert lv["threshold"] == pytest.approx(float(np.quantile(vals, 0.99)), rel=1e-12)
    assert lv["n_positions"] == vals.size and lv["n_images"] == 2 and lv["quantile"] == 0.99
    assert lv["border_margin"] == DEFAULT_BORDER_MARGIN and "held out of the Gaussian" in lv["method"]
    assert lv["chi_quantile"] == pytest.approx(chi_quantile(0.99, 12))
    assert sc.threshold() == lv["threshold"] == sc.meta["thresholds"]["fea_up1"]
    info = sc.threshold_info()
    assert info["calibrated"] and info["source"].startswith("calibrated: empirical 0.99 quantile")
    # one image: nothing to hold out, the chi quantile with the reason
    one = rd.ood.fit_flow(flow, imgs[:1])
    assert one.meta["n_images"] == 1 and not one.threshold_info()["calibrated"]
    assert one.threshold() == pytest.approx(chi_quantile(0.99, 12))
    assert "too few images" in one.threshold_info()["source"]


def test_calibration_survives_save_and_load_and_is_dropped_by_merge(tmp_path):
    flow = tiny_flow()
    sc = rd.ood.fit_flow(flow, _images(5))
    back = MahalanobisScorer.load(sc.save(tmp_path / "s.safetensors"))
    assert back.meta["format_version"] == 2 and back.threshold() == sc.threshold()
    assert back.meta["threshold_calibration"] == sc.meta["threshold_calibration"]
    merged = MahalanobisScorer.merge([sc, rd.ood.fit_flow(flow, _images(5, seed=1))])
    assert not merged.threshold_info()["calibrated"] and "merged" in merged.threshold_info()["source"]


def _as_version_1(src, dst):
    """Rewrites a statistics file as the format-1 layout (no calibration in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["meta"])
    meta.pop("threshold_calibration")
    meta["format_version"] = 1
    meta["thresholds"] = {lv: chi_quantile(0.99, int(tensors[f"{lv}.mean"].shape[0])) for lv in meta["levels"]}
    meta["threshold_source"] = "chi quantile 0.99 with D degrees of freedom"
    header.update(format_version="1", meta=json.dumps(meta))
    save_file(tensors, str(dst), metadata=header)
    return dst


def test_old_format_statistics_load_and_score_with_the_chi_quantile_and_a_warning(tmp_path, capsys):
    ck = rd.save_flow(tiny_flow(), tmp_path / "tiny.safetensors")
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        write_png(train / f"t{i}.png", smooth_rgb(16, 20, seed=i))
    new = tmp_path / "new.safetensors"
    assert main(["fit", str(ck), "--images", str(train), "--out", str(new), "--no-progress"]) == 0
    old = _as_version_1(new, tmp_path / "old.safetensors")
    sc = MahalanobisScorer.load(old)
    info = sc.threshold_info()
    assert sc.threshold() == pytest.approx(chi_quantile(0.99, 12)) and info["calibrated"] is False
    assert "statistics format version 1 holds no calibration" in info["source"]
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["score", str(ck), "--stats", str(old), "--images", str(train), "--out", str(out),
                 "--border-margin", "2", "--no-progress"]) == 0
    cap = capsys.readouterr()
    warn = [ln for ln in cap.err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "no calibrated threshold for fea_up1" in warn[0] and "chi quantile" in warn[0]
    assert "threshold fea_up1:" in cap.out and "format version 1" in cap.out
    run = json.loads((out / "run.json").read_text())["scoring"]
    assert run["threshold_sources"]["fea_up1"]["calibrated"] is False and run["border_margin"] == 2
    assert run["thresholds"]["fea_up1"] == pytest.approx(chi_quantile(0.99, 12))
    # the new file: calibrated, no warning; a run with another border margin than the calibration's is told so
    out2 = tmp_path / "o2"
    assert main(["score", str(ck), "--stats", str(new), "--images", str(train), "--out", str(out2),
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err
    run = json.loads((out2 / "run.json").read_text())["scoring"]
    assert run["threshold_sources"]["fea_up1"]["calibrated"] is True
    assert run["thresholds"]["fea_up1"] == MahalanobisScorer.load(new).threshold()
    _, rows = read_table(out2 / "scores.csv")
    assert {r["threshold"] for r in rows} == {repr(run["thresholds"]["fea_up1"])}
    assert main(["score", str(ck), "--stats", str(new), "--images", str(train), "--out", str(tmp_path / "o3"),
                 "--border-margin", "0", "--no-progress"]) == 0
    assert "calibrated with border margin 3 but this run leaves out 0" in capsys.readouterr().err


def test_score_with_a_small_margin_measures_and_records_the_stitching_error(tmp_path, capsys):
    ck = rd.save_flow(tiny_flow(), tmp_path / "tiny.safetensors")
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        write_png(train / f"t{i}.png", smooth_rgb(16, 20, seed=i))
    stats = tmp_path / "s.safetensors"
    assert main(["fit", str(ck), "--images", str(train), "--out", str(stats), "--no-progress"]) == 0
    test = tmp_path / "test"
    test.mkdir()
    write_png(test / "big.png", smooth_rgb(40, 44, seed=7))        # tiled with tile 8, margin 2: 40x44 > 12x12
    write_png(test / "small.png", smooth_rgb(10, 12, seed=8))      # within one 12x12 window: whole, exact
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["score", str(ck), "--stats", str(stats), "--images", str(test), "--out", str(out), "--tile", "8",
                 "--margin", "2", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "tile margin 2 < the flow's receptive field 32 LR px" in cap.err
    assert "stitching NOT exact (margin 2 < receptive field 32 LR px): measured max |error| of the distance map " \
           "on 1 tiled image(s) (1 checked whole, the others at a tile corner): fea_up1" in cap.out
    st = json.loads((out / "run.json").read_text())["scoring"]["stitching"]
    assert st["exact"] is False and st["tiled_images"] == 1 and st["worst_image"] == {"fea_up1": "big.png"}
    assert st["checked_whole"] == 1                                # 40x44 is within (2 x 16 + 2 x 32)^2 px
    assert st["max_abs"]["fea_up1"] > 1e-4 and st["max_rel"]["fea_up1"] > 0 and "tile corner" in st["method"]
    maps = tmp_path / "maps"                                        # the recorded error is the image's largest
    assert main(["score", str(ck), "--stats", str(stats), "--images", str(test / "big.png"), "--out", str(maps),
                 "--tile", "8", "--margin", "2", "--save-maps", "--no-progress"]) == 0
    assert main(["score", str(ck), "--stats", str(stats), "--images", str(test / "big.png"), "--out",
                 str(tmp_path / "exact"), "--save-maps", "--no-progress"]) == 0
    from robustness_diag.analyses.inputs import flat_name
    name = f"{flat_name('big.png')}.fea_up1.npy"
    diff = np.abs(np.load(maps / "maps" / name) - np.load(tmp_path / "exact" / "maps" / name)).max()
    assert st["max_abs"]["fea_up1"] == pytest.approx(float(diff), rel=1e-4, abs=1e-5)
