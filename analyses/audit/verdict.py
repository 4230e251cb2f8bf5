"""The verdict policy: what the audit found, named so that it cannot be misread, judged on the paper's per-image
criterion as well as on the mechanism, with the measured rates as reasons.

Inputs are the JSON summaries of :mod:`.measure` (``static``, the condition rows) and :mod:`.attack` (the adversarial
summaries, every found input re-sampled with fresh latents). A *test* is the clean condition, a degradation
condition, an attack within the 8/255 budget (each objective) or its best-of-N random baseline. The *flag* is the
paper's per-image criterion applied to every sample: any pixel above 1.5, below -0.5 or non-finite, before clamping;
a test's *flag rate* is the fraction of its samples flagged (a :func:`..clustered.rate` record: k of n, interval
over source photos, exact upper bound when k = 0). Log slopes are natural logs; fractions are of pixels.

Verdicts, the first that applies (:data:`VERDICTS`):

* **fails on clean inputs** (:data:`FAILS_ON_CLEAN`): a sample of the clean held-out crops is flagged (any rate
  above 0) or has a non-finite pixel;
* **exploding inverse** (:data:`EXPLODING`): a test produced a non-finite output, or an inverse slope (on its own
  samples; for attacks on fresh latents) within 1% in log (:data:`.config.NEAR_BOUND`) of the coupling's hard bound
  ``1/eps`` (only bounds above :data:`.config.LARGE_BOUND` count);
* **out-of-range artifacts** (:data:`OUT_OF_RANGE`): no explosion, but a degradation's or an 8/255 attack's flag
  rate is above :data:`.config.FLAG_RATE` (5% of samples; the point estimate, its interval stated next to it);
* **rare out-of-range artifacts** (:data:`RARE`): flagged samples, none non-finite, no test above the rate;
* **no artifacts found** (:data:`NONE_FOUND`): no flagged sample in any test; each line states how high the rate
  may still be (the exact one-sided upper bound).

Reasons: the first line is the verdict, its rule and the numbers that decide it; then one line per test - the 8/255
attacks (each objective, with its random baseline of the same budget and objective) and every condition - each with
the flag rate, the out-of-range and non-finite pixel fractions and the largest inverse slope (attacks: on fresh
latents, the search's own fixed-latent slope labelled as such). Caveats: the unconstrained attacks (any image in
[0, 1]) and what the coupling's inverse bound does and does not bound. ``verdict_tests`` holds the same numbers per
test for machines.
"""
from __future__ import annotations

import math
from typing import Optional

from .config import FLAG_RATE, LARGE_BOUND, NEAR_BOUND, SMALL_BUDGET

FAILS_ON_CLEAN = "fails on clean inputs"
EXPLODING = "exploding inverse"
OUT_OF_RANGE = "out-of-range artifacts"
RARE = "rare out-of-range artifacts"
NONE_FOUND = "no artifacts found"
#: every verdict, worst first
VERDICTS = (FAILS_ON_CLEAN, EXPLODING, OUT_OF_RANGE, RARE, NONE_FOUND)
CRITERION = "the paper's per-image flag (any pixel > 1.5, < -0.5 or non-finite)"
#: each verdict's rule, in words
RULES = {
    FAILS_ON_CLEAN: f"a clean held-out sample is flagged by {CRITERION}",
    EXPLODING: "a non-finite output, or an inverse slope at the coupling's 1/eps bound, under a degradation or "
               "within the 8/255 adversarial budget",
    OUT_OF_RANGE: f"no explosion, but more than {FLAG_RATE:.0%} of the samples of a degradation or an 8/255 attack "
                  f"are flagged by {CRITERION}",
    RARE: f"flagged samples under a degradation or an 8/255 attack, none non-finite, none of these rates above "
          f"{FLAG_RATE:.0%}",
    NONE_FOUND: f"no sample of any degradation or 8/255 attack is flagged by {CRITERION}; the rates may still be up "
                f"to the stated upper bounds",
}
OBJECTIVE_NAMES = {"slope": "inverse-slope objective", "artifact": "out-of-range objective"}


def label(c: dict) -> str:
    """``"noise1 (LR Gaussian noise, sigma 0.05)"``: a stress condition's label with what it is."""
    from robustness_diag.data.degradations import describe

    text = describe(c["condition"])
    return c["condition"] if text == c["condition"] else f"{c['condition']} ({text})"


# -- text of one rate / slope ---------------------------------------------------------------------------------------
def rate_text(rec: dict, unit: str = "samples") -> str:
    """``"83.3% of samples flagged (5 of 6 from 2 independent sources; 95% CI 35.9%-99.6% exact binomial, 66.7%-100.0%
    source bootstrap)"``, or for no event ``"0 of 12 samples flagged (the rate may still be up to 22.1%, one-sided
    95%, exact)"``.

    Both intervals are given: the source bootstrap respects that samples of one photo are not independent but
    collapses with few sources (4 of 4 from 2 photos gives 100%-100%); the exact binomial interval treats the samples
    as independent."""
    if rec.get("value") is None:
        return f"no {unit} ({rec.get('undefined', 'nothing measured')})"
    conf = (rec.get("interval") or {}).get("confidence", 0.95)
    k, n = rec["k"], rec["n"]
    if k == 0:
        ub = rec.get("upper_bound")
        bound = "" if ub is None else f" (the rate may still be up to {ub:.1%}, one-sided {conf:.0%}, exact)"
        return f"0 of {n} {unit} flagged{bound}"
    cis = []
    if rec.get("exact_ci"):
        cis.append(f"{rec['exact_ci'][0]:.1%}-{rec['exact_ci'][1]:.1%} exact binomial")
    exact_shown = str((rec.get("interval") or {}).get("method", "")).startswith("exact")
    if rec.get("ci_low") is not None and not exact_shown:      # at a rate of 1 the bootstrap cannot move
        cis.append(f"{rec['ci_low']:.1%}-{rec['ci_high']:.1%} source bootstrap")
    ci = f"; {conf:.0%} CI " + ", ".join(cis) if cis else ""
    src = f" from {rec['n_sources']} independent sources" if rec.get("n_sources") else ""
    return f"{rec['value']:.1%} of {unit} flagged ({k} of {n}{src}{ci})"


def short_rate(rec: dict) -> str:
    """``"83.3% (5 of 6)"``."""
    return "no samples" if rec.get("value") is None else f"{rec['value']:.1%} ({rec['k']} of {rec['n']})"


def slope_text(log_slope: Optional[float]) -> str:
    """``"max inverse slope 24.1"`` (the slope, not its log)."""
    return "no finite inverse slope" if log_slope is None else f"max inverse slope {math.exp(log_slope):.3g}"


def _flag(row: dict) -> dict:
    """The row's flag-rate record; rows without one (older summaries) get an exact-only record from their
    ``frac_samples_with_artifact`` (all samples one source)."""
    if row.get("paper_flag") is not None:
        return row["paper_flag"]
    from ..clustered import rate

    n = int(row.get("images", 1)) * int(row.get("samples", 1))
    return rate([round(row["frac_samples_with_artifact"] * n)], [n], [0], unit="sample")


# -- the tests ------------------------------------------------------------------------------------------------------
def _tests(conditions: list, adversarial: dict, at_bound) -> list:
    """One record per judged test: conditions (``kind`` clean / degradation), 8/255 attacks and random baselines,
    and the unconstrained attacks (``kind`` unconstrained, not judged)."""
    tests = []

    def add(name, kind, text, row, slope_key, **extra):
        rec = _flag(row)
        slope = row.get(slope_key)
        nonfinite = row["frac_nonfinite_pixels"] > 0
        explodes = nonfinite or at_bound(slope)
        tests.append({"test": name, "kind": kind, "text": text, "flag": rec,
                      "flag_rate": rec.get("value"), "k": rec.get("k"), "n": rec.get("n"),
                      "ci_low": rec.get("ci_low"), "ci_high": rec.get("ci_high"), "exact_ci": rec.get("exact_ci"),
                      "n_sources": rec.get("n_sources"),
                      "upper_bound": rec.get("upper_bound"),
                      "frac_artifact_pixels": row["frac_artifact_pixels"],
                      "frac_nonfinite_pixels": row["frac_nonfinite_pixels"], "max_log_slope": slope,
                      "explodes": bool(explodes),
                      "explosion": "non-finite output" if nonfinite else "inverse slope at the 1/eps bound"
                      if explodes else None,
                      "above_threshold": (rec.get("value") or 0.0) > FLAG_RATE, **extra})

    for c in conditions:
        add(c["condition"], "clean" if c["condition"] == "clean" else "degradation", label(c), c, "max_log_slope")
    for name, a in adversarial.items():
        kind = a.get("kind")
        if kind not in ("attack", "random"):
            continue
        obj = OBJECTIVE_NAMES.get(a.get("objective"), a.get("objective"))
        if kind == "attack" and a["epsilon"] > SMALL_BUDGET + 1e-9:
            add(name, "unconstrained" if a["epsilon"] >= 1 else "attack (large budget)",
                f"adversarial LR, budget {a['epsilon']:.3g} ({obj})", a, "sampled_max_log_slope",
                objective=a.get("objective"))
        elif kind == "attack":
            add(name, "attack", f"adversarial LR within 8/255 ({obj}, best of {a['iterates_evaluated']} iterates)",
                a, "sampled_max_log_slope", objective=a.get("objective"))
        else:
            add(name, "random", f"random sign noise +-8/255 (best of {a['draws']} draws by the {obj})", a,
                "sampled_max_log_slope", objective=a.get("objective"))
    return tests


def _line(t: dict, adversarial: dict) -> str:
    """One reason line: the test, its flag rate, pixel fractions, slope, and what it triggers."""
    a = adversarial.get(t["test"], {})
    slope = slope_text(t["max_log_slope"])
    if t["kind"] in ("attack", "random", "unconstrained", "attack (large budget)"):
        slope += " on fresh latents"
        if a.get("attack_latents_max_log_slope") is not None:
            slope += f" ({math.exp(a['attack_latents_max_log_slope']):.3g} on the search's own latents)"
    text = (f"{t['text']}: {rate_text(t['flag'])}; {t['frac_artifact_pixels']:.2%} of pixels out of range, "
            f"{t['frac_nonfinite_pixels']:.2%} non-finite; {slope}")
    marks = []
    if t["explodes"]:
        marks.append(f"exploding inverse: {t['explosion']}")
    if t["above_threshold"] and t["kind"] != "unconstrained":
        marks.append(f"flag rate above {FLAG_RATE:.0%}")
    return text + (f" [{'; '.join(marks)}]" if marks else "")


def _public(t: dict) -> dict:
    return {k: v for k, v in t.items() if k not in ("flag", "text")}


def verdict(static: dict, conditions: list, adversarial: dict) -> dict:
    """Applies the rules above to one model: ``static`` (``bound_log_slope``), ``conditions`` (rows with
    ``condition``, ``paper_flag``, ``frac_artifact_pixels``, ``frac_nonfinite_pixels``, ``max_log_slope``) and
    ``adversarial`` (``{label: summary}`` of :func:`.attack.measure_adversarial`, possibly empty).

    Returns ``{"verdict", "rule", "reasons": [str], "caveats": [str], "flag_rate_threshold", "exploding_inverse",
    "verdict_tests"}``: ``verdict`` one of :data:`VERDICTS`, ``rule`` its rule in words, ``exploding_inverse``
    whether a judged test explodes (also under "fails on clean inputs"), ``verdict_tests`` one record per test
    (``test``, ``kind``, ``flag_rate``, ``k``, ``n``, ``n_sources``, ``ci_low`` / ``ci_high`` (source bootstrap),
    ``exact_ci``, ``upper_bound`` (k = 0), pixel fractions, ``max_log_slope``, ``explodes``, ``explosion``,
    ``above_threshold``, ``objective`` for attacks)."""
    bound = static.get("bound_log_slope")

    def at_bound(v):
        return bound is not None and bound > math.log(LARGE_BOUND) and v is not None and v >= NEAR_BOUND * bound

    tests = _tests(conditions, adversarial, at_bound)
    judged = [t for t in tests if t["kind"] in ("clean", "degradation", "attack", "random")]
    clean = next((t for t in tests if t["kind"] == "clean"), {"k": 0, "frac_nonfinite_pixels": 0.0})
    others = [t for t in judged if t["kind"] != "clean"]
    # lines: attacks with their random baselines first, then the conditions in suite order
    order = ([t for t in judged if t["kind"] in ("attack", "random")]
             + [t for t in judged if t["kind"] in ("clean", "degradation")])
    lines = [_line(t, adversarial) for t in order]
    caveats = [_line(t, adversarial) for t in tests if t not in judged]
    sloped = [t for t in tests if t["max_log_slope"] is not None]
    if bound is None and sloped:
        top = max(sloped, key=lambda t: t["max_log_slope"])
        caveats.append(f"this coupling has no hard bound on its inverse slope (largest measured: "
                       f"{math.exp(top['max_log_slope']):.3g}, {top['text']}); a bounded inverse displacement "
                       "keeps outputs finite, not in range")
    elif bound is not None and bound <= math.log(LARGE_BOUND):
        caveats.append(f"inverse slope bounded by construction at {math.exp(bound):.3g} per coupling")
    worst = max(others, key=lambda t: (t["flag_rate"] or 0.0, t["frac_nonfinite_pixels"]), default=None)
    attacked = [t for t in judged if t["kind"] == "attack"]
    under_attack = "" if not attacked else "; under the 8/255 attack: " + ", ".join(
        f"{short_rate(t['flag'])} flagged with the {OBJECTIVE_NAMES.get(t.get('objective'), t.get('objective'))}"
        for t in attacked)
    worst_text = ("" if worst is None else f"; worst: {worst['text']}, {short_rate(worst['flag'])} flagged") + \
        under_attack
    n_tests = len(judged)
    exploding = [t for t in judged if t["explodes"]]

    if (clean["k"] or 0) > 0 or clean["frac_nonfinite_pixels"] > 0:
        name = FAILS_ON_CLEAN
        mechanism = (f"exploding inverse in {len(exploding)} of {n_tests} tests "
                     f"({', '.join(sorted({t['explosion'] for t in exploding}))})" if exploding else
                     "no exploding inverse in any test (no non-finite output, no inverse slope at a 1/eps bound)")
        head = (f"{name}: clean held-out crops, {rate_text(clean['flag'])} by {CRITERION}; "
                f"{clean['frac_nonfinite_pixels']:.2%} of pixels non-finite; {mechanism}{under_attack}")
    elif exploding:
        name = EXPLODING
        kinds = sorted({t["explosion"] for t in exploding})
        head = (f"{name}: {len(exploding)} of {n_tests} tests ({', '.join(kinds)}"
                + (f"; the bound is {math.exp(bound):.3g}" if bound is not None else "") + f"){worst_text}")
    elif any(t["above_threshold"] for t in others):
        name = OUT_OF_RANGE
        above = [t for t in others if t["above_threshold"]]
        head = (f"{name}: more than {FLAG_RATE:.0%} of the samples flagged by {CRITERION}, in {len(above)} of "
                f"{n_tests} tests; no non-finite output and no inverse slope at a 1/eps bound{worst_text}")
    elif any((t["k"] or 0) > 0 for t in others):
        name = RARE
        flagged = [t for t in others if (t["k"] or 0) > 0]
        head = (f"{name}: flagged samples in {len(flagged)} of {n_tests} tests, none above {FLAG_RATE:.0%} and none "
                f"non-finite{worst_text}")
    else:
        name = NONE_FOUND
        ubs = [t["upper_bound"] for t in judged if t["upper_bound"] is not None]
        n_all = sum(t["n"] or 0 for t in judged)
        head = (f"{name}: 0 samples flagged by {CRITERION}, in each of {n_tests} tests ({n_all} samples in all); "
                f"no non-finite output and no inverse slope at a 1/eps bound; per test the flag rate may still be up "
                f"to {max(ubs, default=1.0):.1%} (one-sided 95%, exact){under_attack}")
    return {"verdict": name, "rule": RULES[name], "reasons": [head] + lines, "caveats": caveats,
            "flag_rate_threshold": FLAG_RATE, "exploding_inverse": bool(exploding),
            "verdict_tests": [_public(t) for t in tests]}


__all__ = ["FAILS_ON_CLEAN", "EXPLODING", "OUT_OF_RANGE", "RARE", "NONE_FOUND", "VERDICTS", "RULES", "CRITERION",
           "label", "rate_text", "short_rate", "slope_text", "verdict"]
