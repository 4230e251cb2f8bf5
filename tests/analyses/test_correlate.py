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
