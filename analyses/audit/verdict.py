"""The verdict policy: robust / at risk / failing, with the measured numbers as reasons.

Inputs are the JSON summaries of :mod:`.measure` (``static``, the condition rows, the adversarial summaries); log
slopes are natural logs, fractions are of pixels in [0, 1]. Rules, in order:

* **failing**: artifacts or non-finite values on clean in-distribution inputs;
* **at risk**: the exploding inverse is reachable - a non-finite output, or an inverse slope within 1% (in log,
  :data:`.config.NEAR_BOUND`) of the coupling's hard bound ``1/eps`` (only bounds above :data:`.config.LARGE_BOUND`
  count), under a documented degradation or within the 8/255 adversarial budget;
* **robust**: otherwise: finite outputs everywhere tested and no coupling near an inverse bound.

Out-of-range (finite) pixel rates above 1% under degradations and the unconstrained adversarial result are listed as
caveats.
"""
from __future__ import annotations

import math

from .config import LARGE_BOUND, NEAR_BOUND


def label(c: dict) -> str:
    """``"noise1 (LR Gaussian noise, sigma 0.05)"``: a stress condition's label with what it is."""
    from robustness_diag.data.degradations import describe

    text = describe(c["condition"])
    return c["condition"] if text == c["condition"] else f"{c['condition']} ({text})"


def verdict(static: dict, conditions: list, adversarial: dict) -> dict:
    """Applies the rules above to one model: ``static`` (``bound_log_slope``), ``conditions`` (rows with
    ``condition``, ``frac_artifact_pixels``, ``frac_nonfinite_pixels``, ``max_log_slope``) and ``adversarial``
    (``{label: summary}``, possibly empty). Returns ``{"verdict", "reasons": [str], "caveats": [str]}``."""
    reasons, caveats = [], []
    clean = next(c for c in conditions if c["condition"] == "clean")
    bound = static["bound_log_slope"]
    if clean["frac_artifact_pixels"] > 0 or clean["frac_nonfinite_pixels"] > 0:
        reasons.append(f"artifacts on clean held-out inputs: {clean['frac_artifact_pixels']:.2%} of pixels "
                       f"({clean['frac_nonfinite_pixels']:.2%} non-finite)")
        return {"verdict": "failing", "reasons": reasons, "caveats": caveats}

    def at_bound(v):
        return bound is not None and bound > math.log(LARGE_BOUND) and v is not None and v >= NEAR_BOUND * bound

    for c in conditions:
        if c["frac_nonfinite_pixels"] > 0:
            reasons.append(f"{label(c)}: NaN/Inf output in {c['frac_nonfinite_pixels']:.2%} of pixels")
        elif at_bound(c["max_log_slope"]):
            reasons.append(f"{label(c)}: inverse slope {math.exp(c['max_log_slope']):.3g} reaches the 1/eps "
                           f"bound {math.exp(bound):.3g}")
    small = adversarial.get("budget_8_255", {})
    if small:
        if small["frac_nonfinite_pixels"] > 0 or at_bound(small["found_max_log_slope"]):
            rnd = adversarial.get("random_8_255", {})
            vs = "" if rnd.get("sampled_max_log_slope") is None else \
                (f" (random sign noise of the same budget: inverse slope {math.exp(rnd['sampled_max_log_slope']):.3g}, "
                 f"{rnd['frac_artifact_pixels']:.2%} artifact pixels)")
            reasons.append(f"adversarial LR within 8/255: inverse slope {math.exp(small['found_max_log_slope']):.3g}"
                           f"{vs}, {small['frac_artifact_pixels']:.2%} artifact and "
                           f"{small['frac_nonfinite_pixels']:.2%} non-finite pixels")
    for c in conditions:
        if c["frac_artifact_pixels"] > 0.01 and c["frac_nonfinite_pixels"] == 0:
            caveats.append(f"{label(c)}: {c['frac_artifact_pixels']:.2%} of pixels out of range (finite)")
    unc = adversarial.get("unconstrained", {})
    if unc:
        caveats.append(f"unconstrained adversarial input: inverse slope {math.exp(unc['found_max_log_slope']):.3g}, "
                       f"{unc['frac_artifact_pixels']:.2%} out-of-range and {unc['frac_nonfinite_pixels']:.2%} "
                       f"non-finite pixels")
    if reasons:
        return {"verdict": "at risk", "reasons": reasons, "caveats": caveats}
    kind = "bounded by construction (no 1/eps bound reached)" if bound is None else \
        f"bounded by construction (at most {math.exp(bound):.3g} per coupling)" if bound <= math.log(LARGE_BOUND) else \
        f"largest inverse slope {max(math.exp(c['max_log_slope'] or 0) for c in conditions):.3g} < bound " \
        f"{math.exp(bound):.3g}"
    return {"verdict": "robust", "caveats": caveats,
            "reasons": [f"finite outputs under every degradation and the 8/255 adversarial search; inverse {kind}"]}


