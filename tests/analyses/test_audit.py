"""The audit on the bundled flows at a tiny budget: verdicts, reasons, adversarial vs random, report, resume."""
from __future__ import annotations

import json
import math

import pytest

from robustness_diag.analyses import audit as A
from robustness_diag.reports.correlate_report import rerender

TINY = dict(images=2, lr_size=12, samples=2, levels=(3,), fit_images=4, attack_images=1, attack_steps=4,
            bootstrap=20)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    return out, A.run(A.AuditConfig(out=str(out), progress=False, overrides=TINY), render=rerender)


def test_verdict_separates_affine_and_spline_for_stated_reasons(audited):
    _, res = audited
    by = {m["coupling"]: m for m in res["models"]}
    aff, rq = by["affine"], by["rqspline"]
    assert aff["verdict"] == "at risk" and rq["verdict"] == "robust"
    assert any("NaN/Inf" in r or "1/eps" in r or "adversarial" in r for r in aff["reasons"])
    # the spline never produced a non-finite pixel anywhere in the suite
    assert all(c["frac_nonfinite_pixels"] == 0 for c in rq["conditions"])
    assert rq["adversarial"]["budget_8_255"]["frac_nonfinite_pixels"] == 0
    assert aff["static"]["bound_log_slope"] == pytest.approx(math.log(1e4))
    assert rq["static"]["bound_log_slope"] is None


def test_adversarial_search_beats_random_noise_of_the_same_budget_on_affine(audited):
    _, res = audited
    adv = next(m for m in res["models"] if m["coupling"] == "affine")["adversarial"]
    assert adv["budget_8_255"]["found_max_log_slope"] > adv["random_8_255"]["sampled_max_log_slope"] + 1.0
    assert adv["budget_8_255"]["found_max_log_slope"] >= A.NEAR_BOUND * math.log(1e4)


def test_report_and_resume(audited):
    out, res = audited
    html = (out / "report.html").read_text()
    assert "at risk" in html and "robust" in html and html.count("data:image/png;base64,") >= 5
    summary = json.loads((out / "audit.json").read_text())
    assert {m["verdict"] for m in summary["models"]} == {"at risk", "robust"}
    # simulate an interrupted audit: one condition and the report are gone; the rest is reused as saved
    work = out / "work" / "sr4x_affine"
    kept = (work / "cond_clean.json").stat().st_mtime_ns
    (work / "cond_noise3.json").unlink()
    (out / "report.html").unlink()
    again = A.run(A.AuditConfig(out=str(out), progress=False, overrides=TINY), render=rerender)
    assert (work / "cond_noise3.json").is_file() and (out / "report.html").is_file()
    assert (work / "cond_clean.json").stat().st_mtime_ns == kept
    assert [m["verdict"] for m in again["models"]] == [m["verdict"] for m in res["models"]]


def test_unknown_or_corrupt_checkpoint_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    res = A.run(A.AuditConfig(checkpoints=[str(bad), str(tmp_path / "missing.pth")], out=str(tmp_path / "o"),
                              progress=False, overrides=TINY))
    assert res["models"] == [] and res["report"] is None
    assert "not a checkpoint" in res["failures"][0]["error"] and "no such file" in res["failures"][1]["error"]
