"""The audit on the bundled flows at a tiny budget: verdicts, reasons, adversarial vs random, report, outputs
written once, resume after an interruption; and the resume cache on its own."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from robustness_diag.analyses import audit as A
from robustness_diag.analyses.audit import measure as M
from robustness_diag.analyses.audit.verdict import EXPLODING, FAILS_ON_CLEAN
from robustness_diag.analyses.audit.cache import ResumeCache
from robustness_diag.io import json_text
from robustness_diag.reports.correlate_report import render

TINY = dict(images=2, lr_size=12, samples=2, levels=(3,), fit_images=4, attack_images=1, attack_steps=4,
            bootstrap=20)
OUTPUTS = ("audit.json", "metrics.json", "report_data.json", "examples.npz", "report.html")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    return out, A.run(A.AuditConfig(out=str(out), progress=False, overrides=TINY), render=render)


def _without_out(path) -> dict:
    """A written JSON without the (folder-dependent) ``out`` settings."""
    d = json.loads(path.read_text())
    d["config"].pop("out")
    return d


def test_verdict_separates_affine_and_spline_for_stated_reasons(audited):
    _, res = audited
    by = {m["coupling"]: m for m in res.summaries}
    aff, rq = by["affine"], by["rqspline"]
    # the affine flow's inverse explodes; the spline's does not, though its samples leave the valid range
    assert aff["exploding_inverse"] and not rq["exploding_inverse"]
    assert aff["verdict"] in (FAILS_ON_CLEAN, EXPLODING) and rq["verdict"] != EXPLODING
    assert any("NaN/Inf" in r or "non-finite" in r or "1/eps" in r for r in aff["reasons"])
    # the spline never produced a non-finite pixel anywhere in the suite
    assert all(c["frac_nonfinite_pixels"] == 0 for c in rq["conditions"])
    assert all(a["frac_nonfinite_pixels"] == 0 for a in rq["adversarial"].values())
    # every attack is reported with its paper-flag rate and N, both objectives present
    assert {a["objective"] for a in rq["adversarial"].values() if a["kind"] == "attack"} == {"slope", "artifact"}
    assert all(a["paper_flag"]["n"] >= 1 for a in rq["adversarial"].values())
    assert aff["static"]["bound_log_slope"] == pytest.approx(math.log(1e4))
    assert rq["static"]["bound_log_slope"] is None


def test_adversarial_search_beats_random_noise_of_the_same_budget_on_affine(audited):
    _, res = audited
    adv = next(m for m in res.summaries if m["coupling"] == "affine")["adversarial"]
    # slopes re-measured on fresh latents; the random baseline is the best of as many draws as the attack evaluated
    assert adv["slope_8_255"]["sampled_max_log_slope"] > adv["random_slope_8_255"]["sampled_max_log_slope"] + 1.0
    assert adv["slope_8_255"]["attack_latents_max_log_slope"] >= A.NEAR_BOUND * math.log(1e4)
    assert adv["random_slope_8_255"]["draws"] == adv["slope_8_255"]["iterates_evaluated"]


def test_outputs_are_what_the_run_returned(audited):
    out, res = audited
    html = (out / "report.html").read_text()
    assert all(m["verdict"] in html for m in res.summaries) and html.count("data:image/png;base64,") >= 5
    assert res.report == out / "report.html"
    assert {k: p.name for k, p in res.paths.items()} == dict(zip(("audit", "metrics", "report_data", "examples",
                                                                  "report"), OUTPUTS))
    summary = json.loads((out / "audit.json").read_text())
    assert summary["models"] == json.loads(json_text(res.summaries))
    assert summary["config"]["device"] == "cpu"                       # the resolved device, not "auto"
    assert json.loads((out / "report_data.json").read_text()) == json.loads(json_text(res.report_data))
    assert json.loads((out / "metrics.json").read_text())["models"] == json.loads(json_text(res.metrics))
    assert [v["model"] for v in res.report_data["verdicts"]] == [m.name for m in res.models]
    assert all("recommended_threshold" in m for m in res.summaries)
    assert not list(out.glob(".*.tmp*")) and not list(out.glob("*.tmp*"))
    # the resume cache holds every unit, the report folder nothing else
    work = out / "work" / "sr4x_affine"
    assert {"key.json", "static.json", "ood_stats.safetensors", "adversarial.json", "adversarial.npz",
            "cond_clean.json", "cond_clean.npz", "cond_noise3.json", "cond_noise3.npz"} <= {p.name for p in
                                                                                            work.iterdir()}


def test_interrupted_audit_resumes_to_the_same_outputs(audited, tmp_path, monkeypatch):
    ref, _ = audited
    out = tmp_path / "again"
    cfg = A.AuditConfig(out=str(out), progress=False, overrides=TINY)
    real, calls = M.measure_condition, []

    def dies_on_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(M, "measure_condition", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        A.run(cfg, render=render)
    monkeypatch.setattr(M, "measure_condition", real)
    work = out / "work" / "sr4x_affine"
    assert sorted(p.name for p in work.glob("cond_*.json")) == ["cond_blur3.json", "cond_clean.json",
                                                                 "cond_noise3.json"]
    assert not (out / "audit.json").exists()                            # written once, at the end
    kept = (work / "cond_clean.json").stat().st_mtime_ns
    again = A.run(cfg, render=render)
    assert (work / "cond_clean.json").stat().st_mtime_ns == kept          # reused as saved, not recomputed
    assert (out / "report.html").is_file() and again.report == out / "report.html"
    for name in ("audit.json", "metrics.json"):
        assert _without_out(out / name) == _without_out(ref / name), name


def test_unknown_or_corrupt_checkpoint_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    res = A.run(A.AuditConfig(checkpoints=[str(bad), str(tmp_path / "missing.pth")], out=str(tmp_path / "o"),
                              progress=False, overrides=TINY))
    assert res.summaries == [] and res.report is None and res.report_data is None
    assert "not a checkpoint" in res.failures[0]["error"] and "no such file" in res.failures[1]["error"]
    assert json.loads((tmp_path / "o" / "audit.json").read_text())["failures"] == res.failures


def test_cache_reads_only_when_resuming_with_the_same_key(tmp_path):
    computed = []

    def unit(v):
        def compute():
            computed.append(v)
            return {"x": v, "nan": float("nan")}, {"a": np.arange(3.0) * v}
        return compute

    first = ResumeCache(tmp_path, {"seed": 0}, resume=True)
    s, arrays = first.arrays_unit("cond_clean", unit(1))
    assert s["x"] == 1 and computed == [1]
    s, arrays = ResumeCache(tmp_path, {"seed": 0}, resume=True).arrays_unit("cond_clean", unit(2))
    assert s["x"] == 1 and math.isnan(s["nan"]) and arrays["a"].tolist() == [0.0, 1.0, 2.0] and computed == [1]
    # an unfinished unit (no .json) is recomputed
    (tmp_path / "cond_clean.json").unlink()
    assert ResumeCache(tmp_path, {"seed": 0}, resume=True).arrays_unit("cond_clean", unit(3))[0]["x"] == 3
    # another key or resume=False: the folder's units are removed and recomputed
    assert ResumeCache(tmp_path, {"seed": 1}, resume=True).json_unit("static", lambda: {"y": 4}) == {"y": 4}
    assert not (tmp_path / "cond_clean.npz").exists()
    assert ResumeCache(tmp_path, {"seed": 1}, resume=False).json_unit("static", lambda: {"y": 5}) == {"y": 5}
    assert ResumeCache(tmp_path, {"seed": 1}, resume=True).json_unit("static", lambda: {"y": 6}) == {"y": 5}


def test_budget_and_device_are_checked():
    with pytest.raises(ValueError, match="budget"):
        A.run(A.AuditConfig(budget="huge", progress=False))
    with pytest.raises(ValueError, match="--device"):
        A.run(A.AuditConfig(device="tpu", progress=False))


def test_bundled_flows_have_no_defaulted_settings(audited):
    _, res = audited
    assert all(s["settings"]["defaulted"] == [] for s in res.summaries)
    assert not [w for w in res.report_data["warnings"] if "defaulted" in w]


def test_defaulted_settings_are_stated_in_the_summary_and_the_report(tmp_path):
    import torch

    from tests.synth import build_state_dict, read_manifest, reduce_manifest

    path = tmp_path / "SRFlow_DF2K_4X.pth"
    torch.save(build_state_dict(reduce_manifest(read_manifest("SRFlow_DF2K_4X"), nb=5, K=2), seed=0), path)
    res = A.run(A.AuditConfig(checkpoints=[str(path)], out=str(tmp_path / "o"), progress=False, overrides=TINY),
                render=render)
    s = res.summaries[0]
    assert "blocks" in s["settings"]["defaulted"]            # stacked RRDB block indices: not in the weights
    blocks = s["settings"]["defaulted_values"]["blocks"]
    assert blocks and all(isinstance(b, int) for b in blocks)
    warning = A.settings_warning(s)
    assert f"blocks={blocks!r}" in warning and "--config" in warning
    assert warning in res.report_data["warnings"]
    saved = json.loads((tmp_path / "o" / "audit.json").read_text())["models"][0]["settings"]
    assert saved == s["settings"]
    assert f"blocks={blocks!r}" in res.report.read_text()


def test_three_granularities_with_n_unit_and_interval(audited):
    """metrics.json and the report give image-level, within-condition and within-image discrimination, each with
    its resampling unit, the number of independent sources and an interval; the gate is judged out of sample."""
    out, res = audited
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    for m in metrics.values():
        il, wc, wi = m["image_level"], m["within_condition"], m["within_image"]
        for block in (il, wc, wi):
            assert block["unit"] == "source image" and block["question"]
        # two crops per condition from two photos, plus two graphics images: four independent sources
        assert il["n_sources"] == 4 and il["n_images"] == 2 * len(m["within_condition"]["per_condition"])
        assert il["auroc"].get("value") is None or "interval" in il["auroc"]
        assert {r["condition"] for r in wc["per_condition"]} >= {"clean", "graphics"}
        gate = m["gate"]
        assert gate["n_sources_choose"] + gate["n_sources_judge"] == 4 and gate["unit"] == "image"
        if gate.get("value") is not None:
            h = gate["heldout"]
            assert h["false_alarm"]["n"] == h["false_alarm_clean"]["n"] + h["false_alarm_degraded"]["n"]
        assert m["bootstrap"]["unit"] == "source image" and m["bootstrap"]["n_resamples"] == 20
    html = (out / "report.html").read_text()
    assert "Image level: AUROC" in html and "Within condition" in html and "Within image" in html
    assert "held out" in html
    # every condition row carries the paper's per-sample flag rate with its N
    for s in res.summaries:
        for c in s["conditions"]:
            assert c["paper_flag"]["unit"] == "sample" and c["paper_flag"]["n"] == 2 * 2
