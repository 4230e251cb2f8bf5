"""The audit run, one way: scenarios -> measurements -> verdicts -> report data -> output files.

:func:`run` measures every checkpoint (:mod:`.measure`, resumable through :mod:`.cache`), applies the verdict policy
(:mod:`.verdict`), computes the correlation statistics of the stress-suite observations
(:func:`robustness_diag.analyses.correlate.analyse`), shapes the report data (:mod:`.report_data`) and then writes,
each exactly once and atomically, into ``out``:

* ``audit.json``: the configuration (device resolved), the named budget and per model the summary (verdict, reasons,
  caveats, condition rows, adversarial results, OOD fit, recommended threshold), plus the failures;
* ``metrics.json``, ``report_data.json``, ``examples.npz``: what ``correlate`` writes for its reports;
* through ``render(out, report_data, examples) -> Path`` (passed in by the caller, e.g.
  :func:`robustness_diag.reports.correlate_report.render`): the figures with their CSV sidecars and ``report.html``.

Nothing written here is read back; only the resume cache under ``out/work/`` is read, and only when resuming.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from robustness_diag.devices import resolve_device
from robustness_diag.io import atomic_write_json

from .. import correlate as C
from . import report_data as R
from .config import BUDGETS, BUNDLED, AuditConfig, AuditError, budget_of
from .measure import measure_model
from .verdict import verdict


@dataclass
class AuditResult:
    """What :func:`run` produced. ``summaries``: the ``audit.json`` entry per audited model; ``models``: the
    measurements behind them (same order); ``failures``: ``{"checkpoint", "error"}`` per checkpoint not audited;
    ``report_data`` / ``metrics``: the report data and statistics (None when nothing could be audited); ``paths``:
    output name -> file written (``audit``, ``metrics``, ``report_data``, ``examples``, ``report``); ``report``:
    the HTML report (None without ``render`` or when nothing could be audited)."""

    out: Path
    summaries: list = field(default_factory=list)
    models: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    report_data: Optional[dict] = None
    metrics: Optional[dict] = None
    paths: dict = field(default_factory=dict)
    report: Optional[Path] = None


def _measure_all(cfg: AuditConfig, budget: dict, out: Path, device: torch.device) -> tuple[list, list]:
    """``(measurements, failures)``: one bad checkpoint does not stop the others (its error goes to the report).

    A failure of one checkpoint is ``{"checkpoint", "error"}``: the checkpoint error (unreadable, malformed, unknown
    layout), the OOD fit's refusal (non-finite features, e.g. from NaN weights) or, as a last resort, any other
    exception as ``"<spec>: internal error: <type>: <message>"`` (no traceback); the others are audited."""
    from robustness_diag.flows.errors import CheckpointError, internal_error
    from robustness_diag.ood.errors import OODError

    measured, failures = [], []
    for spec in list(cfg.checkpoints) or list(BUNDLED):
        try:
            measured.append(measure_model(spec, cfg, budget, out / "work", device))
        except (CheckpointError, AuditError, OODError, FileNotFoundError, ValueError) as e:
            failures.append({"checkpoint": str(spec), "error": str(e)})
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # last resort: an unforeseen failure of one checkpoint is its entry, the others go on
            failures.append({"checkpoint": str(spec), "error": f"{spec}: {internal_error(e)}"})
    return measured, failures


def run(cfg: AuditConfig, render: Optional[Callable] = None) -> AuditResult:
    """Audits every checkpoint (default: both bundled flows) and writes the outputs listed in the module docstring.

    ``render(out_dir, report_data, examples) -> Path`` draws the figures and ``report.html`` from the in-memory
    report data (the CLI passes :func:`robustness_diag.reports.correlate_report.render`; analyses never import the
    report layer). Raises ValueError for an unknown budget or device."""
    budget = budget_of(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    measured, failures = _measure_all(cfg, budget, out, device)
    verdicts = [verdict(m.static, [c.summary for c in m.conditions], m.adversarial) for m in measured]
    res = AuditResult(out, models=measured, failures=failures)
    if measured:
        ccfg = R.correlate_config(str(out), budget, cfg.false_alarm, cfg.seed, [m.name for m in measured])
        results = [R.model_result(m) for m in measured]
        res.metrics = C.analyse(results, ccfg)
        res.summaries = [R.summary(m, v, res.metrics[m.name].get("gate")) for m, v in zip(measured, verdicts)]
        res.report_data = R.report_data(results, res.metrics, ccfg, res.summaries, failures, cfg.budget, budget)
        examples = C.titled_examples(results)
        res.paths["metrics"] = atomic_write_json(out / "metrics.json",
                                                 {"config": res.report_data["config"], "models": res.metrics})
        res.paths["report_data"] = atomic_write_json(out / "report_data.json", res.report_data)
        res.paths["examples"] = C.save_examples(out / "examples.npz", examples)
    res.paths["audit"] = atomic_write_json(out / "audit.json", {
        "config": {**asdict(cfg), "device": str(device)}, "budget": BUDGETS[cfg.budget], "models": res.summaries,
        "failures": failures})
    if measured and render is not None:
        res.report = Path(render(out, res.report_data, examples))
        res.paths["report"] = res.report
    return res

