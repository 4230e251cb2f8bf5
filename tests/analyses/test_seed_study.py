"""The seed study's bookkeeping: statements checked seed by seed, ranges across seeds, the budget check."""
from __future__ import annotations

import pytest

from robustness_diag.analyses.seed_study import (Member, budget_check, check_statements, markdown, parse_name,
                                                 study, summarise)

CONDS = ("clean", "noise1", "noise2", "blur1", "jpeg1", "graphics")


def _row(flag=0.0, art=0.0, nonfinite=0.0, slope=3.0, k=None, n=32):
    k = round(flag * n) if k is None else k
    lo, hi = (0.0, 0.1) if k == 0 else (max(0.0, flag - 0.2), min(1.0, flag + 0.2))
    return {"frac_samples_with_artifact": flag, "frac_artifact_pixels": art, "frac_nonfinite_pixels": nonfinite,
            "max_inverse_slope": slope, "paper_flag": {"value": k / n, "k": k, "n": n, "ci_low": lo, "ci_high": hi}}


def _affine(seed, noise_nan=True, graphics_flag=0.5, steps=1500, recipe="base"):
    rows = {c: _row() for c in CONDS}
    rows["noise1"] = _row(0.9, 0.3, 0.1 if noise_nan else 0.0, 1e4)
    rows["noise2"] = _row(1.0, 1.0, 0.9, 1e4)
    rows["graphics"] = _row(graphics_flag, 0.2, 0.1, 1e4 if graphics_flag else 5.0)
    return Member(f"affine_{recipe}_seed{seed}", "affine", recipe, seed, steps, rows)


def _spline(seed, noise1_flag=0.3, steps=1500, recipe="base"):
    rows = {c: _row() for c in CONDS}
    rows["noise1"] = _row(noise1_flag, 0.01, 0.0, 40.0)
    rows["noise2"] = _row(1.0, 0.2, 0.0, 300.0)
    return Member(f"rqspline_{recipe}_seed{seed}", "rqspline", recipe, seed, steps, rows)


def test_names_parse_and_bad_names_are_refused():
    assert parse_name("rqspline_dequant_seed0") == {"coupling": "rqspline", "recipe": "dequant", "seed": 0}
    with pytest.raises(ValueError, match="not a study flow name"):
        parse_name("sr4x_affine")


def test_statements_count_the_seeds_that_support_them():
    members = [_affine(0), _affine(1, noise_nan=False), _affine(2), _spline(0), _spline(1, noise1_flag=1.0),
               _spline(2)]
    st = {s["key"]: s for s in check_statements(members)}
    assert st["affine_nonfinite_under_noise"]["n_hold"] == 2 and st["affine_nonfinite_under_noise"]["n"] == 3
    assert st["affine_nonfinite_under_noise"]["holds"] == ["affine seed 0", "affine seed 2"]
    assert st["spline_never_nonfinite"]["n_hold"] == 3
    assert st["clean_unflagged"]["n"] == 6 and st["clean_unflagged"]["n_hold"] == 6
    assert st["affine_artifacts_at_bound"]["n_hold"] == 3
    assert st["spline_below_bound"]["n_hold"] == 3
    # seed-matched pairs: seed 1's spline is flagged more under noise1 than its affine
    assert st["affine_flags_more_under_noise"]["holds"] == ["seed 0", "seed 2"]


def test_a_statement_can_fail():
    bad = _spline(0)
    bad.rows["graphics"] = _row(0.5, 0.1, 0.01, 1e4)        # a NaN and a saturated slope
    st = {s["key"]: s for s in check_statements([bad, _affine(0)])}
    assert st["spline_never_nonfinite"]["n_hold"] == 0 and st["spline_below_bound"]["n_hold"] == 0
    st = {s["key"]: s for s in check_statements([_spline(0, noise1_flag=0.0), _spline(1)])}
    assert st["spline_flagged_under_noise"]["holds"] == ["rqspline seed 1"]


def test_summary_ranges_across_seeds():
    rec = [r for r in summarise([_affine(0, graphics_flag=0.25), _affine(1, graphics_flag=0.75)])
           if r["condition"] == "graphics"][0]
    f = rec["frac_samples_with_artifact"]
    assert f["per_seed"] == [0.25, 0.75] and f["mean"] == 0.5 and (f["min"], f["max"]) == (0.25, 0.75)
    assert rec["seeds"] == [0, 1] and [p["k"] for p in rec["paper_flag_per_seed"]] == [8, 24]


def test_budget_check_names_the_conditions_that_differ():
    full = _affine(0, steps=6000)
    same = budget_check(_affine(0), full)
    assert same["matches"] and same["n_match"] == len(CONDS)
    short = _affine(0, noise_nan=False, graphics_flag=0.0)   # loses the noise1 NaN and all graphics artifacts
    b = budget_check(short, full)
    assert not b["matches"] and {r["condition"] for r in b["conditions"] if not r["matches"]} == {"noise1",
                                                                                                  "graphics"}


def test_markdown_shows_counts_and_ranges():
    members = [_affine(0), _affine(1), _spline(0), _spline(1), _affine(0, recipe="noise"),
               _spline(0, recipe="noise")]
    res = study(members, {"affine": _affine(0, steps=6000)}, "1500 training steps per flow", "test")
    text = markdown(res)
    assert "| the RQ-spline flow produces no non-finite pixel in any condition | 2 of 2 |" in text
    assert "Recipe `noise`" in text and "6 of 6 conditions match" in text
    assert "| affine | base | 0,1 | graphics | 0.50 [0.50, 0.50] |" in text


def test_model_card_section_counts_seeds_per_statement():
    from robustness_diag.analyses.model_card import study_text
    res = study([_affine(0), _affine(1, noise_nan=False), _spline(0), _spline(1)], None, "1500 steps", "test")
    text = study_text(res, "affine")
    assert "| the affine flow produces non-finite pixels under LR noise (every level) | 1 of 2 (affine seed 0, " \
           "affine seed 1) |" in text
    assert "RQ-spline flow produces no non-finite" not in text and "| base | 0,1 | noise1 |" in text


def test_a_failed_budget_check_is_said_at_the_top():
    res = study([_affine(0, noise_nan=False)], {"affine": _affine(0, steps=6000)}, "1500 steps", "test")
    text = markdown(res)
    head = text.split("## Statements")[0]
    assert "does not reproduce the full one" in head and "5 of 6 conditions match" in head
    assert "noise1 (flag rate 0.90 vs 0.90, non-finite no vs yes)" in text


def test_members_trained_elsewhere_join_the_runs_folder(tmp_path):
    from robustness_diag.analyses.seed_study import _flows
    for name in ("affine_base_seed1", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.safetensors").write_bytes(b"")
    (tmp_path / "rqspline_base_seed2").mkdir()                      # unfinished: no weights yet
    flows = _flows(tmp_path, ["affine_base_seed0=bundled:sr4x_affine"])
    assert [(n, f) for n, f, _ in flows] == [
        ("affine_base_seed1", str(tmp_path / "affine_base_seed1" / "affine_base_seed1.safetensors")),
        ("affine_base_seed0", "bundled:sr4x_affine")]
    assert flows[1][2] == tmp_path / "affine_base_seed0"
    with pytest.raises(ValueError, match="coupling_recipe_seedN"):
        _flows(tmp_path, ["seed0=bundled:sr4x_affine"])
    with pytest.raises(SystemExit, match="NAME=FLOW"):
        _flows(tmp_path, ["affine_base_seed0"])


def test_side_by_side_gives_every_seed_of_both_couplings():
    from robustness_diag.analyses.seed_study import side_by_side
    res = study([_affine(0), _affine(1, noise_nan=False), _spline(0), _spline(2, noise1_flag=0.5)], None, "x", "y")
    lines = side_by_side(res).splitlines()
    assert lines[0] == ("| condition | affine flagged samples (seeds 0; 1) | affine non-finite px | "
                        "RQ spline flagged samples (seeds 0; 2) | RQ spline non-finite px |")
    noise1 = next(line for line in lines if "sigma 0.05" in line)
    assert noise1 == ("| LR Gaussian noise, sigma 0.05 | 29/32 [0.70, 1.00]; 29/32 [0.70, 1.00] | 0.1; 0 | "
                      "10/32 [0.10, 0.50]; 16/32 [0.30, 0.70] | 0; 0 |")
    assert lines[2].startswith("| clean held-out |") and "## The couplings side by side" in markdown(res)


def test_seed_position_says_where_seed_0_falls():
    from robustness_diag.analyses.seed_study import seed_position
    res = study([_affine(0, graphics_flag=0.2), _affine(1, graphics_flag=0.5), _affine(2, graphics_flag=0.1),
                 _spline(0, noise1_flag=0.9), _spline(1)], None, "x", "y")
    pos = seed_position(res)
    # affine: only graphics differs (0.2 between 0.1 and 0.5); spline: only noise1 differs (0.9 > 0.3)
    assert pos["affine"] == {"lowest": 0, "highest": 0, "between": 1, "same": 5, "n_seeds": 3}
    assert pos["rqspline"] == {"lowest": 0, "highest": 1, "between": 0, "same": 5, "n_seeds": 2}
    assert "Seed 0 (the bundled flow) among the seeds" in markdown(res)
