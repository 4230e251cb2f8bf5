"""Fit and score pipelines end to end: bad inputs become rows, outputs on disk, setup errors, OOD ordering."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import robustness_diag as rd
from robustness_diag.analyses.folder_run import read_table
from robustness_diag.analyses import fit, score
from robustness_diag.analyses.fit import FitConfig
from robustness_diag.analyses.inputs import InputOptions, flat_name
from robustness_diag.analyses.score import ScoreConfig
from robustness_diag.ood import MahalanobisScorer
from tests.ood.helpers import one_thread, smooth_rgb, tiny_flow, write_png  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rd.save_flow(tiny_flow(), d / "tiny.safetensors")
    finally:
        torch.set_num_threads(n)


def _train_folder(root, n=3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_png(root / f"t{i}.png", smooth_rgb(18 + 2 * i, 22, seed=i))
    return root


def _png_header_only(path, w, h):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _bad_inputs(root):
    """The issue's list of awkward inputs, generated at test time."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero_byte.png").write_bytes(b"")
    write_png(root / "full.png", smooth_rgb(16, 16, seed=9))
    data = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "full.png").unlink()
    (root / "text.png").write_text("I am not a PNG\n")
    write_png(root / "tiny_4x4.png", smooth_rgb(4, 4, seed=3))
    import tifffile
    tifffile.imwrite(root / "deep_16bit.tif", (smooth_rgb(20, 24, seed=4) * 65535).astype(np.uint16))
    rgba = np.concatenate([(smooth_rgb(18, 20, seed=5) * 255).astype(np.uint8),
                           np.full((18, 20, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "alpha_rgba.png")
    Image.fromarray((smooth_rgb(20, 18, seed=6)[..., 0] * 255).astype(np.uint8)).save(root / "gray.jpg", quality=95)
    _png_header_only(root / "very_large.png", 60_000, 60_000)
    write_png(root / "wide_tiled.png", smooth_rgb(20, 420, seed=7))    # larger than a tile window below: tiled
    return root


EXPECTED = {  # name -> (status, words in the error or notes)
    "zero_byte.png": ("error", "empty file (0 bytes)"),
    "truncated.png": ("error", "truncated or corrupt PNG"),
    "text.png": ("error", "not a recognised image file"),
    "tiny_4x4.png": ("error", "image too small: 4x4"),
    "very_large.png": ("error", "over the limit"),
    "deep_16bit.tif": ("ok", "16-bit"),
    "alpha_rgba.png": ("ok", "alpha channel dropped"),
    "gray.jpg": ("ok", "grayscale repeated to RGB"),
    "wide_tiled.png": ("ok", ""),
}


def _overlay_writer(calls):
    def write(path, image, score_map, *, vmin, vmax, max_side):
        calls.append((path.name, tuple(image.shape), tuple(score_map.shape), vmin, vmax))
        from robustness_diag.reports.overlays import save_overlay
        return save_overlay(path, image, score_map, vmin=vmin, vmax=vmax, max_side=max_side)
    return write


def test_fit_then_score_with_bad_inputs(tmp_path, ckpt):
    train = _train_folder(tmp_path / "train")
    stats = tmp_path / "stats.safetensors"
    fr = fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), inputs=InputOptions(images=[str(train)]),
                       shrinkage="ledoit-wolf", device="cpu", progress=False))
    assert fr.exit_code == 0 and fr.error is None and stats.is_file()
    sc = MahalanobisScorer.load(stats)
    assert sc.meta["checkpoint_digest"] == rd.weights_digest(rd.load_flow(str(ckpt)))
    # input 0 is held out of the Gaussian: its interior distances calibrate the threshold
    assert sc.meta["pixel_count"] == {"fea_up1": sum((18 + 2 * i) * 22 for i in (1, 2))}
    assert sc.meta["shrinkage"] == "ledoit_wolf" and sc.meta["input"] == "lr" and sc.meta["n_images"] == 2
    cal = sc.meta["threshold_calibration"]
    assert cal["status"] == "calibrated" and cal["held_out"] == [0] and cal["n_images"] == 1
    m = rd.ood.DEFAULT_BORDER_MARGIN
    assert cal["levels"]["fea_up1"]["n_positions"] == (18 - 2 * m) * (22 - 2 * m)
    assert sc.threshold() == cal["levels"]["fea_up1"]["threshold"] and sc.threshold_info()["calibrated"]
    assert "1 held-out image(s)" in fr.summary() and "(calibrated)" in fr.summary()

    bad = _bad_inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    calls = []
    res = score.run(ScoreConfig(checkpoint=str(ckpt), stats=str(stats), out_dir=str(out),
                          inputs=InputOptions(images=[str(bad)], max_pixels=1_000_000, from_hr=None),
                          save_maps=True, tile=16, batch=2, device="cpu", progress=False,
                          overlay_writer=_overlay_writer(calls)))
    assert res.exit_code == 1
    header, rows = read_table(out / "scores.csv")
    by = {r["path"]: r for r in rows}
    assert set(by) == set(EXPECTED)
    for name, (status, words) in EXPECTED.items():
        r = by[name]
        assert r["status"] == status, (name, r)
        assert words in (r["error"] if status == "error" else r["notes"]), (name, r)
        if status == "ok":
            assert float(r["mean"]) > 0 and float(r["max"]) >= float(r["p99"]) >= float(r["p95"])
            assert 0 <= float(r["frac_above"]) <= 1 and r["level"] == "fea_up1"
            m = np.load(out / "maps" / f"{flat_name(name)}.fea_up1.npy")
            assert m.shape == (int(r["lr_height"]), int(r["lr_width"]))
            inner = m[rd.ood.interior_mask(*m.shape, rd.ood.DEFAULT_BORDER_MARGIN)]   # aggregates: interior
            assert float(r["mean"]) == pytest.approx(float(inner.mean()), rel=1e-5)
            png = Image.open(out / "maps" / f"{flat_name(name)}.fea_up1.png")
            assert png.size[0] == 4 * int(r["lr_width"]) and png.size[1] > 4 * int(r["lr_height"])  # + colour bar
    assert by["wide_tiled.png"]["lr_width"] == "420"
    failed = {f["path"] for f in res.run.failed}
    assert failed == {k for k, v in EXPECTED.items() if v[0] == "error"}
    summary = res.summary()
    assert all(f"FAILED {k}" in summary for k in failed)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["counts"]["ok"] == 4 and info["counts"]["failed"] == 5
    assert info["checkpoint"]["weights_digest"] == sc.meta["checkpoint_digest"]
    assert info["scoring"]["features"]["tile"] == 16 and info["statistics"]["shrinkage"] == "ledoit_wolf"
    assert info["scoring"]["stitching"]["exact"] is True              # margin = receptive field, though tiled
    assert info["scoring"]["threshold_sources"]["fea_up1"]["calibrated"] is True
    assert {c[0] for c in calls} == {f"{flat_name(k)}.fea_up1.png" for k, v in EXPECTED.items()
                                     if v[0] == "ok"}

    # resume: nothing left to do, same table
    res2 = score.run(ScoreConfig(checkpoint=str(ckpt), stats=str(stats), out_dir=str(out),
                           inputs=InputOptions(images=[str(bad)], max_pixels=1_000_000, from_hr=None),
                           resume=True, device="cpu", progress=False))
    assert res2.run.n_processed == 0 and res2.run.n_skipped == len(EXPECTED) and res2.exit_code == 1
    assert len(read_table(out / "scores.csv")[1]) == len(EXPECTED)


def test_scores_match_the_library_and_from_hr(tmp_path, ckpt):
    train = _train_folder(tmp_path / "train")
    stats = tmp_path / "s.safetensors"
    assert fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), device="cpu", progress=False,
                         inputs=InputOptions(images=[str(train)], from_hr=True, min_size=2))).exit_code == 0
    sc = MahalanobisScorer.load(stats)
    assert sc.meta["input"] == "hr"
    out = tmp_path / "o"
    res = score.run(ScoreConfig(checkpoint=str(ckpt), stats=str(stats), out_dir=str(out), device="cpu", progress=False,
                          inputs=InputOptions(images=[str(train / "t0.png")], from_hr=None, min_size=2)))
    assert res.exit_code == 0
    row = read_table(out / "scores.csv")[1][0]
    assert (row["lr_width"], row["lr_height"]) == ("5", "4")            # HR 22x18 downscaled by 4 (statistics' mode)
    flow = rd.load_flow(str(ckpt))
    from robustness_diag.data.images import read_image
    from robustness_diag.data.photos import downscale
    lr = downscale(read_image(train / "t0.png").image[None], 4)
    ref = rd.ood.score_maps(flow, sc, lr)["fea_up1"]
    assert float(row["mean"]) == pytest.approx(rd.ood.aggregate(ref, sc.threshold())["mean"], rel=1e-6)


def test_setup_errors_exit_2(tmp_path, ckpt):
    train = _train_folder(tmp_path / "train", n=2)
    stats = tmp_path / "s.safetensors"
    inputs = InputOptions(images=[str(train)])
    r = fit.run(FitConfig(checkpoint=str(tmp_path / "missing.pth"), out=str(stats), inputs=inputs, progress=False))
    assert r.exit_code == 2 and "missing.pth" in r.error
    r = fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), inputs=inputs, levels=["fea_up8"], progress=False))
    assert r.exit_code == 2 and "fea_up8" in r.error
    r = fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), inputs=InputOptions(images=[str(tmp_path / "none")]),
                      progress=False))
    assert r.exit_code == 2 and "no such file or folder" in r.error
    assert fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), inputs=inputs, device="cpu",
                         progress=False)).exit_code == 0
    other = rd.save_flow(tiny_flow(seed=1), tmp_path / "other.safetensors")
    r = score.run(ScoreConfig(checkpoint=str(other), stats=str(stats), out_dir=str(tmp_path / "o"), inputs=inputs,
                        progress=False))
    assert r.exit_code == 2 and "fitted on checkpoint" in r.error and not (tmp_path / "o" / "scores.csv").exists()
    r = score.run(ScoreConfig(checkpoint=str(ckpt), stats=str(tmp_path / "nope.safetensors"),
                              out_dir=str(tmp_path / "o"), inputs=inputs, progress=False))
    assert r.exit_code == 2 and "nope.safetensors" in r.error
    ok = ScoreConfig(checkpoint=str(ckpt), stats=str(stats), out_dir=str(tmp_path / "o2"), inputs=inputs,
                     progress=False, device="cpu")
    assert score.run(ok).exit_code == 0
    r = score.run(ok)                                                   # the table exists, no --resume
    assert r.exit_code == 2 and "--resume" in r.error


def test_fit_with_no_usable_image_writes_nothing(tmp_path, ckpt):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    stats = tmp_path / "s.safetensors"
    r = fit.run(FitConfig(checkpoint=str(ckpt), out=str(stats), inputs=InputOptions(images=[str(d)]), progress=False))
    assert r.exit_code == 1 and "no statistics written" in r.error and not stats.exists()
    assert r.run.failed == [{"path": "a.png", "error": "empty file (0 bytes)"}]


# ---------------------------------------------------------------------------------------------------------------------
# held-out photos vs degraded versions, on the bundled flows (small setting)
# ---------------------------------------------------------------------------------------------------------------------

def _center(img, size):
    h, w = img.shape[-2:]
    y, x = (h - size) // 2, (w - size) // 2
    return img[..., y:y + size, x:x + size]


def _degraded_scores(name):
    from robustness_diag.data import degradations as dg
    from robustness_diag.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, downscale, load_photo
    flow = rd.load_flow(f"bundled:{name}")
    train = [downscale(_center(load_photo(p), 128)[None], 4) for p in TRAIN_PHOTOS]
    scorer = rd.ood.fit_flow(flow, train, shrinkage="oas")
    hr = _center(load_photo(VALIDATION_PHOTOS[0]), 128)[None]
    lr = downscale(hr, 4)
    g = torch.Generator().manual_seed(0)
    conds = {"clean": lr, "noise": dg.add_noise(lr, 1, g), "blur": dg.blur_mismatch(hr, 1, 4), "jpeg": dg.jpeg(lr, 1)}
    return {k: float(rd.ood.score_maps(flow, scorer, v)["fea_up1"].mean()) for k, v in conds.items()}


@pytest.fixture(scope="module")
def degraded():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: _degraded_scores(name) for name in ("sr4x_affine", "sr4x_rqspline")}
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["sr4x_affine", "sr4x_rqspline"])
def test_noisy_held_out_photo_scores_higher_than_clean(degraded, name):
    s = degraded[name]
    assert s["noise"] > 1.5 * s["clean"], s


@pytest.mark.parametrize("name", ["sr4x_affine", "sr4x_rqspline"])
def test_blur_and_jpeg_are_not_separated_by_the_mean_score(degraded, name):
    """Documents a measured gap of the issue's claim: HR blur before downscaling and LR JPEG (level 1) leave the mean
    fea_up1 distance within a few percent of clean (blur slightly *lower*: features move towards the fitted mean).
    The bundled flows also show no artifacts under blur/JPEG (checkpoints/*.md). If a change separates them, this
    fails and the claim (and the README) should be updated."""
    s = degraded[name]
    assert abs(s["blur"] / s["clean"] - 1) < 0.1 and abs(s["jpeg"] / s["clean"] - 1) < 0.1, s
    assert s["blur"] < s["clean"], s
