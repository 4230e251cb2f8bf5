"""The phenomenon across seeds and recipes: which statements about affine versus spline flows hold for every seed.

Each trained flow of the study (``checkpoints/recipes/study/*.yaml``: coupling x recipe x seed) is measured by
:mod:`.phenomenon` with the model cards' settings; this module gathers those measurements and reports, per coupling,
recipe and condition, the mean and the range across seeds of the artifact-pixel fraction, the non-finite fraction,
the per-sample rate of the paper's flag and the largest inverse slope, and checks a fixed list of statements
(:data:`STATEMENTS`) seed by seed. Nothing here is tuned to the result: the statements are the ones the README made
from one seed, tested on every seed; each reports how many seeds support it.

``python -m robustness_diag.analyses.seed_study --runs runs/study --out checkpoints/study`` measures every finished
study flow under ``--runs`` (``NAME/NAME.safetensors``; skipped when its ``phenomenon.json`` exists), copies each
training log and phenomenon JSON to ``--out/NAME/`` and writes ``--out/study.json`` and ``--out/study.md``.
``--members affine_base_seed0=bundled:sr4x_affine ...`` adds flows trained elsewhere (the bundled seed-0 pair of the
full-budget study); ``--full`` names the full-budget flows a shorter budget is checked against (none: no check).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from robustness_diag.io import atomic_write_json, atomic_write_text
from robustness_diag.io import from_json_number as num

from .clustered import rate_cell

#: metrics summarised across seeds: phenomenon row field -> short label
METRICS = {"frac_samples_with_artifact": "flag rate", "frac_artifact_pixels": "artifact px",
           "frac_nonfinite_pixels": "non-finite px", "max_inverse_slope": "max inverse slope"}
#: the inverse-slope bound of the affine coupling, 1/eps with eps = 1e-4
SLOPE_BOUND = 1e4
NAME = re.compile(r"^(?P<coupling>affine|rqspline)_(?P<recipe>[a-z]+)_seed(?P<seed>\d+)$")


@dataclass
class Member:
    """One trained flow of the study: ``coupling``, ``recipe`` ("base", "dequant", "noise"), ``seed``, ``steps``
    trained, and its phenomenon ``rows`` (one dict per condition, :func:`.phenomenon.measure` fields)."""

    name: str
    coupling: str
    recipe: str
    seed: int
    steps: int
    rows: dict

    def value(self, condition: str, metric: str) -> float:
        """``metric`` of ``condition`` as a float (JSON's "nan"/"inf" strings included)."""
        return num(self.rows[condition][metric])


def parse_name(name: str) -> dict:
    """``"affine_base_seed1"`` -> ``{"coupling": "affine", "recipe": "base", "seed": 1}``."""
    m = NAME.match(name)
    if not m:
        raise ValueError(f"not a study flow name (coupling_recipe_seedN): {name!r}")
    return {"coupling": m["coupling"], "recipe": m["recipe"], "seed": int(m["seed"])}


def member_from_json(name: str, phenomenon: dict, steps: int) -> Member:
    """A :class:`Member` from a ``phenomenon.json`` content holding one flow's rows."""
    rows = {r["condition"]: r for r in phenomenon["rows"]}
    return Member(name=name, steps=int(steps), rows=rows, **parse_name(name))


# -- statements -------------------------------------------------------------------------------------------------------
def _any_nonfinite(m: Member, conds) -> bool:
    return any(m.value(c, "frac_nonfinite_pixels") > 0 for c in conds)


#: (key, text, coupling it is about, test of one member (its conditions as argument) or of a seed-matched pair)
STATEMENTS: list = [
    ("spline_never_nonfinite", "the RQ-spline flow produces no non-finite pixel in any condition", "rqspline",
     lambda m, conds: not _any_nonfinite(m, conds)),
    ("affine_nonfinite_under_noise", "the affine flow produces non-finite pixels under LR noise (every level)",
     "affine", lambda m, conds: all(m.value(c, "frac_nonfinite_pixels") > 0 for c in conds if c.startswith("noise"))),
    ("affine_nonfinite_somewhere", "the affine flow produces non-finite pixels in some condition", "affine",
     lambda m, conds: _any_nonfinite(m, conds)),
    ("clean_unflagged", "no clean held-out sample is flagged", "both",
     lambda m, conds: m.value("clean", "frac_samples_with_artifact") == 0),
    ("mild_unflagged", "no sample is flagged under blur-kernel mismatch or JPEG (any level)", "both",
     lambda m, conds: all(m.value(c, "frac_samples_with_artifact") == 0 for c in conds
                          if c.startswith(("blur", "jpeg")))),
    ("affine_artifacts_at_bound", "every condition with affine artifacts reached the 1/eps inverse-slope bound",
     "affine", lambda m, conds: all(m.value(c, "max_inverse_slope") >= 0.999 * SLOPE_BOUND for c in conds
                                    if m.value(c, "frac_samples_with_artifact") > 0)),
    ("spline_below_bound", "the RQ-spline flow's largest inverse slope stays below 1e4 in every condition",
     "rqspline", lambda m, conds: all(m.value(c, "max_inverse_slope") < SLOPE_BOUND for c in conds)),
    ("spline_flagged_under_noise", "the RQ-spline flow's samples still leave the valid range under LR noise (some "
     "sample flagged at every noise level)", "rqspline",
     lambda m, conds: all(m.value(c, "frac_samples_with_artifact") > 0 for c in conds if c.startswith("noise"))),
]
#: pair statements: (key, text, test of a seed-matched (affine, spline) pair)
PAIR_STATEMENTS: list = [
    ("affine_flags_more_under_noise", "under LR noise sigma 0.05 (noise1) the affine flow is flagged at least as "
     "often as the spline flow", lambda a, s: a.value("noise1", "frac_samples_with_artifact")
     >= s.value("noise1", "frac_samples_with_artifact")),
    ("affine_more_artifact_pixels", "summed over conditions, the affine flow has more artifact pixels than the "
     "spline flow", lambda a, s: sum(a.value(c, "frac_artifact_pixels") for c in a.rows)
     > sum(s.value(c, "frac_artifact_pixels") for c in s.rows)),
]


def check_statements(members: list, recipe: str = "base") -> list:
    """Each statement of :data:`STATEMENTS` / :data:`PAIR_STATEMENTS` over the members of ``recipe``: ``{"key",
    "text", "coupling", "seeds" (the seeds tested), "holds" (the seeds where it holds), "n_hold", "n"}``; pair
    statements use seed-matched pairs (the same seed number: the same training batches)."""
    group = [m for m in members if m.recipe == recipe]
    out = []
    for key, text, coupling, test in STATEMENTS:
        ms = [m for m in group if coupling in ("both", m.coupling)]
        rows = [(m, bool(test(m, list(m.rows)))) for m in sorted(ms, key=lambda m: (m.coupling, m.seed))]
        out.append({"key": key, "text": text, "coupling": coupling,
                    "tested": [f"{m.coupling} seed {m.seed}" for m, _ in rows],
                    "holds": [f"{m.coupling} seed {m.seed}" for m, ok in rows if ok],
                    "n_hold": sum(ok for _, ok in rows), "n": len(rows)})
    by = {(m.coupling, m.seed): m for m in group}
    seeds = sorted({s for c, s in by if (("affine", s) in by and ("rqspline", s) in by)})
    for key, text, test in PAIR_STATEMENTS:
        ok = [s for s in seeds if test(by["affine", s], by["rqspline", s])]
        out.append({"key": key, "text": text, "coupling": "pair", "tested": [f"seed {s}" for s in seeds],
                    "holds": [f"seed {s}" for s in ok], "n_hold": len(ok), "n": len(seeds)})
    return out


# -- summaries --------------------------------------------------------------------------------------------------------
def summarise(members: list) -> list:
    """Per (coupling, recipe, condition): for every metric of :data:`METRICS` the per-seed values, mean, min and
    max; the flag rate also as k/n per seed with its interval."""
    groups: dict = {}
    for m in sorted(members, key=lambda m: (m.coupling, m.recipe, m.seed)):
        groups.setdefault((m.coupling, m.recipe), []).append(m)
    out = []
    for (coupling, recipe), ms in groups.items():
        for cond in ms[0].rows:
            rec = {"coupling": coupling, "recipe": recipe, "condition": cond, "seeds": [m.seed for m in ms],
                   "steps": sorted({m.steps for m in ms})}
            for metric in METRICS:
                vals = [m.value(cond, metric) for m in ms]
                finite = [v for v in vals if math.isfinite(v)]
                rec[metric] = {"per_seed": vals, "mean": statistics.fmean(finite) if finite else float("nan"),
                               "min": min(vals), "max": max(vals)}
            rec["paper_flag_per_seed"] = [{k: m.rows[cond]["paper_flag"].get(k) for k in ("value", "k", "n", "ci_low",
                                                                                        "ci_high", "upper_bound")}
                                          for m in ms if isinstance(m.rows[cond].get("paper_flag"), dict)]
            out.append(rec)
    return out


def budget_check(short: Member, full: Member) -> dict:
    """Does the phenomenon at the study's shorter step budget match the full budget (same coupling, recipe, seed)?

    Per condition: whether any pixel is non-finite (same answer at both budgets), whether any sample is flagged
    (same answer), and whether the flag rates' 95% intervals overlap. ``matches``: all three for every condition."""
    per = []
    for cond in full.rows:
        a, b = short.rows[cond], full.rows[cond]
        fa, fb = a.get("paper_flag") or {}, b.get("paper_flag") or {}
        overlap = (None if not (fa and fb) else
                   not (num(fa["ci_high"]) < num(fb["ci_low"]) or num(fb["ci_high"]) < num(fa["ci_low"])))
        rec = {"condition": cond,
               "nonfinite": [num(a["frac_nonfinite_pixels"]) > 0, num(b["frac_nonfinite_pixels"]) > 0],
               "flagged": [num(a["frac_samples_with_artifact"]) > 0, num(b["frac_samples_with_artifact"]) > 0],
               "flag_rate": [num(a["frac_samples_with_artifact"]), num(b["frac_samples_with_artifact"])],
               "intervals_overlap": overlap}
        rec["matches"] = rec["nonfinite"][0] == rec["nonfinite"][1] and rec["flagged"][0] == rec["flagged"][1] \
            and overlap is not False
        per.append(rec)
    return {"short": short.name, "short_steps": short.steps, "full": full.name, "full_steps": full.steps,
            "conditions": per, "n_match": sum(r["matches"] for r in per), "n": len(per),
            "matches": all(r["matches"] for r in per)}


# -- text -------------------------------------------------------------------------------------------------------------
def _fmt(metric: str, v: float) -> str:
    if metric == "max_inverse_slope":
        return f"{v:.3g}"
    if metric == "frac_samples_with_artifact":
        return f"{v:.2f}"
    return "0" if v == 0 else f"{v:.3g}"


def cell(rec: dict, metric: str) -> str:
    """``mean [min, max]`` across seeds (a single value for one seed)."""
    d = rec[metric]
    if len(d["per_seed"]) == 1:
        return _fmt(metric, d["per_seed"][0])
    return f"{_fmt(metric, d['mean'])} [{_fmt(metric, d['min'])}, {_fmt(metric, d['max'])}]"


def seed_position(result: dict, seed: int = 0, recipe: str = "base",
                  metric: str = "frac_samples_with_artifact") -> dict:
    """Where ``seed``'s flow falls among the seeds of ``recipe``, per coupling, over the conditions where the seeds
    differ in ``metric``: ``{coupling: {"lowest", "highest", "between", "same": condition counts, "n_seeds"}}``
    ("lowest"/"highest" include ties with another seed at that end; "same": every seed equal)."""
    out: dict = {}
    for r in result["summary"]:
        if r["recipe"] != recipe or seed not in r["seeds"] or len(r["seeds"]) < 2:
            continue
        vals = r[metric]["per_seed"]
        mine = vals[r["seeds"].index(seed)]
        pos = out.setdefault(r["coupling"], {"lowest": 0, "highest": 0, "between": 0, "same": 0,
                                             "n_seeds": len(r["seeds"])})
        if min(vals) == max(vals):
            pos["same"] += 1
        elif mine == min(vals):
            pos["lowest"] += 1
        elif mine == max(vals):
            pos["highest"] += 1
        else:
            pos["between"] += 1
    return out


def side_by_side(result: dict, recipe: str = "base") -> str:
    """The two couplings side by side for ``recipe``: one row per condition; per coupling every seed's flagged samples
    (k/n with the 95% interval, :func:`.clustered.rate_cell`) and non-finite pixel fraction, in seed order (named in
    the header), separated by ``;``."""
    from robustness_diag.data.degradations import describe
    recs = {(r["coupling"], r["condition"]): r for r in result["summary"] if r["recipe"] == recipe}
    couplings = [c for c in ("affine", "rqspline") if any(k[0] == c for k in recs)]
    if not couplings:
        return ""
    conds = [k[1] for k in recs if k[0] == couplings[0]]
    label = {"affine": "affine", "rqspline": "RQ spline"}
    head = ["condition"]
    for c in couplings:
        seeds = "; ".join(map(str, next(r["seeds"] for k, r in recs.items() if k[0] == c)))
        head += [f"{label[c]} flagged samples (seeds {seeds})", f"{label[c]} non-finite px"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cond in conds:
        cells = [describe(cond) if cond != "clean" else "clean held-out"]
        for c in couplings:
            r = recs.get((c, cond))
            if r is None:
                cells += ["", ""]
                continue
            flags = r.get("paper_flag_per_seed") or [{}] * len(r["seeds"])
            cells += ["; ".join(rate_cell(f) for f in flags),
                      "; ".join(_fmt("frac_nonfinite_pixels", v) for v in r["frac_nonfinite_pixels"]["per_seed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """The study as markdown: statements with seed counts, the budget check, the per-condition table."""
    lines = [f"# The phenomenon across seeds and recipes ({result['steps_note']})", "",
             "Measured by `analyses/phenomenon.py` with the model cards' settings (" + result["measure_note"] + "). "
             "Cells: mean [min, max] across seeds. Flag rate = fraction of samples the paper's per-image criterion "
             "flags (any channel > 1.5 or < -0.5, or non-finite)."]
    failed = [b for b in result.get("budget_checks", []) if not b["matches"]]
    if failed:
        lines += ["", "**The shorter budget does not reproduce the full one** (" + "; ".join(
            f"`{b['short']}`: {b['n_match']} of {b['n']} conditions match" for b in failed) + ", details below): "
            "these numbers describe flows trained for that shorter budget, not the bundled recipe's flows, and do not "
            "say which statements about the bundled flows hold across seeds."]
    lines += ["", "## Statements, seed by seed", "",
             "| statement | holds for | seeds tested |", "|---|---|---|"]
    for s in result["statements"]:
        lines.append(f"| {s['text']} | {s['n_hold']} of {s['n']} | {', '.join(s['tested'])} |")
    table = side_by_side(result)
    pos = seed_position(result)
    if pos:
        lines += ["", "Seed 0 (the bundled flow) among the seeds, by flag rate over the conditions where the seeds "
                  "differ: " + "; ".join(f"{c}: lowest in {p['lowest']}, highest in {p['highest']}, between in "
                                         f"{p['between']} (all {p['n_seeds']} seeds equal in {p['same']})"
                                         for c, p in pos.items()) + "."]
    if table:
        lines += ["", "## The couplings side by side (recipe `base`, every seed)", "",
                  "Flagged samples of each seed, k/n with the 95% interval (the crops are the resampled unit; "
                  "exact Clopper-Pearson at 0 or all flagged; zero counts with their upper bound), and the "
                  "fraction of non-finite pixels.", "",
                  table.rstrip("\n")]
    for recipe, sts in result.get("recipe_statements", {}).items():
        held = [f"{s['text']} ({s['n_hold']}/{s['n']})" for s in sts]
        lines += ["", f"Recipe `{recipe}` (one seed per coupling): " + "; ".join(held) + "."]
    bc = result.get("budget_checks", [])
    if bc:
        lines += ["", "## Shorter budget against the full one (seed 0)", ""]
        for b in bc:
            bad = [f"{r['condition']} (flag rate {r['flag_rate'][0]:.2f} vs {r['flag_rate'][1]:.2f}"
                   + (f", non-finite {'yes' if r['nonfinite'][0] else 'no'} vs {'yes' if r['nonfinite'][1] else 'no'}"
                      if r["nonfinite"][0] != r["nonfinite"][1] else "") + ")"
                   for r in b["conditions"] if not r["matches"]]
            lines.append(f"- `{b['short']}` ({b['short_steps']} steps) vs `{b['full']}` ({b['full_steps']} steps): "
                         f"{b['n_match']} of {b['n']} conditions match (same conditions with non-finite pixels, "
                         f"same conditions flagged, overlapping flag-rate intervals)"
                         + (f"; differ: {', '.join(bad)}" if bad else "") + ".")
    lines += ["", "## Per condition", "",
              "| coupling | recipe | seeds | condition | flag rate | artifact px | non-finite px | max inverse slope |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['coupling']} | {r['recipe']} | {','.join(map(str, r['seeds']))} | {r['condition']} | "
                     + " | ".join(cell(r, m) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def study(members: list, full: Optional[dict] = None, steps_note: str = "", measure_note: str = "") -> dict:
    """Everything :func:`markdown` shows: ``summary``, ``statements`` (base recipe), ``recipe_statements`` (each
    other recipe), ``budget_checks`` (``full``: coupling -> the full-budget seed-0 :class:`Member`)."""
    recipes = sorted({m.recipe for m in members} - {"base"})
    checks = []
    for coupling, f in (full or {}).items():
        short = [m for m in members if m.coupling == coupling and m.recipe == "base" and m.seed == f.seed]
        if short:
            checks.append(budget_check(short[0], f))
    return {"steps_note": steps_note, "measure_note": measure_note, "summary": summarise(members),
            "statements": check_statements(members, "base"),
            "recipe_statements": {r: [s for s in check_statements(members, r) if s["n"]] for r in recipes},
            "budget_checks": checks, "members": [{"name": m.name, "coupling": m.coupling, "recipe": m.recipe,
                                                  "seed": m.seed, "steps": m.steps} for m in members]}


# -- the command ------------------------------------------------------------------------------------------------------
def _measure(flow: str, out: Path, measure: Callable) -> dict:
    path = out / "phenomenon.json"
    if not path.exists():
        measure(str(flow), str(out))
    return json.loads(path.read_text())


def _phenomenon(ckpt: str, out: str) -> None:
    from .phenomenon import PhenomenonConfig, run
    run(PhenomenonConfig([ckpt], out=out))


def _flows(runs: Path, extra: list) -> list:
    """The study's flows: ``(name, flow, run folder)`` for every finished ``runs/NAME/NAME.safetensors`` and every
    ``NAME=FLOW`` of ``extra`` (a flow trained elsewhere, e.g. the bundled seed-0 pair; measured in ``runs/NAME``)."""
    out = []
    for ckpt in sorted(runs.glob("*/*.safetensors")):
        if ckpt.parent.name == ckpt.stem and NAME.match(ckpt.stem):
            out.append((ckpt.stem, str(ckpt), ckpt.parent))
    for spec in extra:
        name, _, flow = spec.partition("=")
        parse_name(name)
        if not flow:
            raise SystemExit(f"--members {spec!r}: expected NAME=FLOW, e.g. affine_base_seed0=bundled:sr4x_affine")
        out.append((name, flow, runs / name))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/study", help="folder of the study's training runs (NAME/NAME.safetensors)")
    p.add_argument("--out", default="checkpoints/study", help="where logs, phenomenon JSONs and the study go")
    p.add_argument("--members", nargs="*", default=[], metavar="NAME=FLOW",
                   help="more members trained elsewhere, e.g. affine_base_seed0=bundled:sr4x_affine (their training "
                        "log is not copied: a bundled flow's log is checkpoints/<name>_train_log.csv)")
    p.add_argument("--full", nargs="*", default=["affine=bundled:sr4x_affine", "rqspline=bundled:sr4x_rqspline"],
                   help="COUPLING=FLOW of the full-budget seed-0 flows for the budget check (none: no check)")
    a = p.parse_args(argv)
    import robustness_diag as rd
    runs, out = Path(a.runs), Path(a.out)
    members = []
    for name, flow, run_dir in _flows(runs, a.members):
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        phen = _measure(flow, run_dir / "phenomenon", _phenomenon)
        shutil.copyfile(run_dir / "phenomenon" / "phenomenon.json", dest / "phenomenon.json")
        if (run_dir / "log.csv").exists():
            shutil.copyfile(run_dir / "log.csv", dest / "train_log.csv")
        steps = rd.load_flow(flow).info.get("provenance", {}).get("recipe", {}).get("steps", 0)
        members.append(member_from_json(name, phen, steps))
        print(f"{name}: measured")
    full = {}
    for spec in a.full:
        coupling, flow = spec.split("=", 1)
        fdir = runs / f"full_{coupling}"
        phen = _measure(flow, fdir, _phenomenon)
        shutil.copyfile(fdir / "phenomenon.json", out / f"full_{coupling}_phenomenon.json")
        full[coupling] = Member(f"{coupling} bundled", coupling, "base", 0, 6000,
                                {r["condition"]: r for r in phen["rows"]})
    steps = sorted({m.steps for m in members})
    res = study(members, full, steps_note=f"{'/'.join(map(str, steps))} training steps per flow",
                measure_note="8 held-out 16 px LR crops of chelsea x 4 samples at heat 0.9 per condition, seed 0")
    atomic_write_json(out / "study.json", res)
    atomic_write_text(out / "study.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
