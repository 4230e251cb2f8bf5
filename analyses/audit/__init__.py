"""Checkpoint audit: what a practitioner runs before deploying a conditional flow.

For each checkpoint (default: the two bundled 4X flows, side by side) the audit runs one way, in memory:

1. **scenarios** (:mod:`.scenarios`): held-out photo crops (never trained on), clean, under every documented
   degradation (:mod:`robustness_diag.data.degradations`) at the budget's severities, and graphics images;
2. **measurements** (:mod:`.measure`): static checks (the ``inspect`` report, the inverse slopes the conditioner
   produces on clean inputs next to the coupling's hard bound), the OOD fit on in-distribution LR inputs, per
   condition ``samples`` traced samples at ``heat`` (artifact and NaN rates, inverse slopes, explosion and OOD score
   maps), and the adversarial search (:mod:`..adversarial`, both objectives, re-sampled on fresh latents, against
   a best-of-N random baseline) within 8/255 and unconstrained;
3. **verdicts** (:mod:`.verdict`): *fails on clean inputs*, *exploding inverse*, *out-of-range artifacts*, *rare
   out-of-range artifacts* or *no artifacts found*, each reason with its per-sample rate, N and interval; and an
   image-level OOD gate chosen on half of the source photos and judged on the other half;
4. **report data** (:mod:`.report_data`) and the output files, each written once (:mod:`.pipeline`).

Budgets and settings are in :mod:`.config`. Every finished unit (per model: static, fit, each condition, the attack)
is saved under ``out/work/`` as it finishes (:mod:`.cache`); running again with the same ``out`` resumes from there
(``resume=False`` starts over).
"""
from __future__ import annotations

from .config import (BUDGETS, BUNDLED, LARGE_BOUND, NEAR_BOUND, SMALL_BUDGET, AuditConfig, AuditError, budget_of,
                     slug)
from .measure import ConditionMeasurement, ModelMeasurement, measure_model
from .pipeline import AuditResult, run
from .report_data import settings_warning, stress_tables
from .scenarios import Scenario, stress_scenarios
from .verdict import label, verdict

__all__ = ["AuditConfig", "AuditError", "AuditResult", "BUDGETS", "BUNDLED", "ConditionMeasurement", "LARGE_BOUND",
           "ModelMeasurement", "NEAR_BOUND", "SMALL_BUDGET", "Scenario", "budget_of", "label", "measure_model", "run",
           "settings_warning", "slug", "stress_scenarios", "stress_tables", "verdict"]
