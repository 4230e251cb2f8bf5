"""The correlation pipeline end to end on the 2-D toy: direction of the effect, outputs, re-rendering, escaping."""
from __future__ import annotations

import json

import numpy as np
import pytest

from robustness_diag.analyses import correlate as C
from robustness_diag.analyses import stats as S
from robustness_diag.reports.correlate_report import rerender


@pytest.fixture(scope="module")
def toy_run(trained_toys, tmp_path_factory):
    out = tmp_path_factory.mktemp("toycorr")
    cfg = C.ToyCorrelateConfig(out=str(out), conditions=40, samples=16, n_resamples=200, flows=trained_toys)
    return out, C.run(cfg, render=rerender)


def test_toy_shows_the_papers_direction_for_affine_and_no_events_for_the_spline(toy_run):
    _, res = toy_run
    assert res.exit_code == 0 and res.error is None
    aff, rq = res.metrics["toy affine"], res.metrics["toy rqspline"]
    # affine: far-OOD conditions explode, in-distribution ones do not -> the score ranks artifacts well
    assert aff["n_events"] > 0 and aff["auroc"]["ci_low"] > 0.7
    assert aff["score_vs_frequency"]["spearman"]["value"] > 0.5
    assert aff["reliability"][-1]["rate"] > aff["reliability"][0]["rate"] == 0.0
    # spline: bounded inverse, never above the threshold -> the metrics are undefined, not 0.5
    assert rq["n_events"] == 0 and rq["auroc"]["value"] is None
    assert rq["auroc"]["undefined"] == S.UNDEFINED_NO_POSITIVE


def test_outputs_sidecars_and_rerender(toy_run):
    out, res = toy_run
    for name in ("metrics.json", "report.html", "report_data.json", "reliability.png", "reliability.csv",
                 "roc_pr.png", "roc_pr.csv", "score_histograms.csv", "per_image.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    assert metrics["toy affine"]["auroc"]["value"] == pytest.approx(res.metrics["toy affine"]["auroc"]["value"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "AUROC" in html and "undefined" in html
    (out / "report.html").unlink()
    rerender(out)
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 4


def test_user_strings_are_escaped_in_the_report(tmp_path):
    rng = np.random.default_rng(0)
    score = rng.normal(size=200)
    obs = S.Observations(score, rng.binomial(2, 1 / (1 + np.exp(-3 * score))), 2, np.arange(200) // 20)
    evil = '<script>alert("x")</script>.png'
    r = C.ModelResult("model <b>", obs, image_names=[evil] * 10,
                      examples=[{"title": evil, "lr": np.zeros((4, 4, 3)), "mask": np.zeros((16, 16))}])
    C.run(C.CorrelateConfig(out=str(tmp_path), n_resamples=20, results=[r]), render=rerender)
    html = (tmp_path / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "model &lt;b&gt;" in html
    assert (tmp_path / "examples.npz").is_file()


def test_analysis_without_a_renderer_writes_data_only(tmp_path):
    """The analysis layer writes the numbers; drawing is the report layer's job (passed in, never imported)."""
    rng = np.random.default_rng(1)
    score = rng.normal(size=100)
    obs = S.Observations(score, rng.binomial(1, 1 / (1 + np.exp(-2 * score))), 1, np.arange(100) // 10)
    res = C.run(C.CorrelateConfig(out=str(tmp_path), n_resamples=10, results=[C.ModelResult("m", obs)]))
    assert res.report is None and not (tmp_path / "report.html").exists()
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report_data.json").is_file()
    assert rerender(tmp_path) == tmp_path / "report.html" and (tmp_path / "reliability.png").is_file()


def _table(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")


def test_join_runs_keeps_images_ok_in_both_and_counts_the_rest(tmp_path):
    """The score/sample join on the image key: order of scores.csv, failures and one-sided images counted; keys
    that look like numbers or NA stay text."""
    head = ["path", "status", "error", "mean", "notes", "seconds"]
    _table(tmp_path / "s" / "scores.csv", head, [["b.png", "ok", "", "1.5", "", "0.1"],
                                                 ["NA", "ok", "", "2.0", "", "0.1"],
                                                 ["1.0", "ok", "", "nan", "", "0.1"],
                                                 ["bad.png", "error", "broken", "", "", "0.0"],
                                                 ["only_scored.png", "ok", "", "3.0", "", "0.1"]])
    _table(tmp_path / "p" / "samples.csv", ["path", "status", "error", "samples", "notes", "seconds"],
           [["1.0", "ok", "", "2", "", "0.2"], ["NA", "ok", "", "2", "", "0.2"], ["b.png", "ok", "", "2", "", "0.2"],
            ["only_sampled.png", "ok", "", "2", "", "0.2"], ["bad.png", "error", "x", "", "", "0.0"],
            ["c.png", "error", "too small", "", "", "0.0"]])
    keys, counts = C.join_runs(tmp_path / "s", tmp_path / "p")
    assert keys == ["b.png", "NA", "1.0"]
    assert counts == {"joined": 3, "score_failed": 1, "sample_failed": 2, "scored_not_sampled": 1,
                      "sampled_not_scored": 1}


def test_run_folders_that_cannot_be_joined_are_a_usage_error(tmp_path):
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "out"), run_dirs=[str(tmp_path)]))
    assert res.exit_code == 2 and "run.json" in res.error and not (tmp_path / "out").exists()
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "out")))
    assert res.exit_code == 2 and "nothing to correlate" in res.error


def _run_folders(root, images):
    """A synthetic pair of 'score' and 'sample' folders without maps: ``images`` = ``[(key, mean, [(artifact_pixels,
    nan_pixels, artifact_fraction), ...per sample])]``."""
    digest = {"path": "bundled:toy_model", "weights_digest": "ab" * 32}
    sdir, pdir = root / "score", root / "sample"
    for d, command in ((sdir, "score"), (pdir, "sample")):
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"command": command, "checkpoint": digest,
                                                "scoring": {"levels": ["L1"], "border_margin": 1}}))
    _table(sdir / "scores.csv", ["path", "status", "error", "level", "mean", "p99", "notes", "seconds"],
           [[k, "ok", "", "L1", str(mean), str(mean), "", "0.1"] for k, mean, _ in images])
    _table(pdir / "samples.csv", ["path", "status", "error", "samples", "notes", "seconds"],
           [[k, "ok", "", str(len(s)), "", "0.1"] for k, _, s in images])
    _table(pdir / "sample_rows.csv", ["path", "sample", "artifact_pixels", "artifact_fraction", "nan_pixels",
                                      "inf_pixels"],
           [[k, str(i), str(a), str(f), str(n), "0"] for k, _, s in images for i, (a, n, f) in enumerate(s)])
    return sdir, pdir


def test_run_folders_without_maps_give_the_image_level(tmp_path):
    """No maps: one image-table row per joined image (score = the 'mean' column; flagged = samples with an artifact
    or NaN pixel; each image its own source, condition 'all'), no per-position observations, the image level and
    gate in strict JSON, a report that renders and re-renders; the AUROC is sklearn's on the table."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        mean = float(rng.normal(5 + i))
        bad = i >= 6 and i != 7                                   # the higher scores break, with one exception
        samples = [(40 if bad and s == 0 else 0, 3 if i == 3 and s == 1 else 0, 0.1 if bad and s == 0 else 0.0)
                   for s in range(2)]                             # image 3: NaN pixels only -> flagged
        images.append((f"sub/img {i}.png", mean, samples))
    sdir, pdir = _run_folders(tmp_path, images)
    (r,) = C.results_from_run_dirs([sdir, pdir])
    assert r.obs is None and "without --save-maps" in r.positions_unavailable and not r.left_out
    t = r.images
    assert t.name == [k for k, _, _ in images] and list(t.source) == list(range(12))
    assert set(t.condition) == {C.RUN_DIR_CONDITION} and list(t.samples) == [2] * 12
    flagged = [i >= 6 and i != 7 or i == 3 for i in range(12)]
    assert list(t.flagged > 0) == flagged and t.artifact_fraction[6] == pytest.approx(0.05)
    assert list(t.score) == [m for _, m, _ in images]
    assert r.join["maps_missing"] == 12 and any("'mean' column" in n and "border margin of 1" in n for n in r.notes)

    out = tmp_path / "out"
    res = C.run(C.CorrelateConfig(out=str(out), run_dirs=[str(sdir), str(pdir)], n_resamples=50), render=rerender)
    assert res.exit_code == 0 and res.error is None

    def refuse(c):
        raise ValueError(c)
    m = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)["models"]["toy_model"]
    json.loads((out / "report_data.json").read_text(), parse_constant=refuse)
    assert m["image_level"]["auroc"]["value"] == pytest.approx(roc_auc_score(flagged, [m for _, m, _ in images]))
    assert m["image_level"]["n_sources"] == 12 and m["gate"]["n_images_judge"] + m["gate"]["n_images_choose"] == 12
    assert "per_position_unavailable" in m and "auroc" not in m and "within_image" not in m
    html = (out / "report.html").read_text()
    assert "per-position analysis not available" in html and not (out / "roc_pr.png").exists()
    (out / "report.html").unlink()
    assert rerender(out) == out / "report.html" and (out / "per_image.png").is_file()


def test_run_folder_rows_that_cannot_be_used_are_left_out(tmp_path):
    """A non-finite image score or per-sample rows that do not match the sample count leave that image out (named,
    exit code 1); the others are analysed."""
    images = [(f"i{i}.png", float(i), [(5 if i % 2 else 0, 0, 0.01 if i % 2 else 0.0)] * 2) for i in range(6)]
    sdir, pdir = _run_folders(tmp_path, images)
    text = (sdir / "scores.csv").read_text().replace("i0.png,ok,,L1,0.0", "i0.png,ok,,L1,nan")
    (sdir / "scores.csv").write_text(text)
    lines = (pdir / "sample_rows.csv").read_text().splitlines(keepends=True)
    (pdir / "sample_rows.csv").write_text("".join(line for line in lines if not line.startswith("i1.png,1,")))
    (r,) = C.results_from_run_dirs([sdir, pdir])
    assert {f["path"] for f in r.left_out} == {"i0.png", "i1.png"} and r.join["rows_unusable"] == 2
    assert r.images.name == ["i2.png", "i3.png", "i4.png", "i5.png"] and r.join["joined"] == 4
    assert "not a finite number" in r.left_out[0]["reason"] and "samples.csv says 2" in r.left_out[1]["reason"]
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "out"), run_dirs=[str(sdir), str(pdir)], n_resamples=20))
    assert res.exit_code == 1 and res.metrics["toy_model"]["image_level"]["n_images"] == 4


def test_run_folders_without_per_sample_rows_give_the_per_position_analysis_only(tmp_path):
    """Folders whose tables cannot give the image level (no sample_rows.csv) but with maps: per position only, said
    in the notes; with neither, a usage error that says both."""
    from robustness_diag.analyses.inputs import flat_name
    rng = np.random.default_rng(2)
    images = [(f"m{i}.png", float(i), [(1, 0, 0.01)] * 2) for i in range(4)]
    sdir, pdir = _run_folders(tmp_path, images)
    (pdir / "sample_rows.csv").unlink()
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "o1"), run_dirs=[str(sdir), str(pdir)], n_resamples=5))
    assert res.exit_code == 2 and "no image level" in res.error and "without --save-maps" in res.error
    (sdir / "maps").mkdir()
    (pdir / "maps").mkdir()
    for i, (key, _, _) in enumerate(images):
        score = rng.normal(size=(4, 4)) + i
        np.save(sdir / "maps" / f"{flat_name(key)}.L1.npy", score.astype(np.float32))
        mask = np.repeat(np.repeat(score > 3, 4, 0), 4, 1)[None].repeat(2, 0)
        np.savez(pdir / "maps" / f"{flat_name(key)}.npz", artifact_mask=mask, explosion=mask.astype(np.float32),
                 attribution=np.full(mask.shape, -1, np.int16), source=np.array(key))
    (r,) = C.results_from_run_dirs([sdir, pdir])
    assert r.images is None and r.obs is not None and r.obs.score.size == 4 * 16
    assert any("image-level statistics not available" in n and "sample_rows.csv" in n for n in r.notes)
    res = C.run(C.CorrelateConfig(out=str(tmp_path / "o2"), run_dirs=[str(sdir), str(pdir)], n_resamples=5))
    assert res.exit_code == 0 and "auroc" in res.metrics["toy_model"] and "image_level" not in res.metrics["toy_model"]
