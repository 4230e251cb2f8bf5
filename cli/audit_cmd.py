"""``robustness-diag audit``: run before deploying a conditional flow.

Static checks (what ``inspect`` reports plus the inverse slopes the conditioner produces on in-distribution inputs),
an OOD fit on in-distribution inputs, a stress suite of documented degradations at several severities, an adversarial
search for the LR input that makes the inverse explode, and a verdict (robust / at risk / failing) with reasons and a
recommended OOD-score threshold for gating inputs - all in OUT/report.html (+ audit.json, metrics.json, CSVs).

Without CKPT it audits the two bundled 4X flows (affine and RQ-spline couplings) side by side.
Running again with the same --out resumes a half-finished audit (--restart starts over).
"""
from __future__ import annotations

import argparse
import sys

from robustness_diag.devices import DEFAULT_DEVICE, DEVICE_HELP
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "audit", help="static, stress and adversarial audit of checkpoints with a verdict and an HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  robustness-diag audit                                 # bundled flows, ~3-6 min on 2 CPU cores\n"
               "  robustness-diag audit SRFlow_DF2K_4X.pth --config SRFlow_DF2K_4X.yml --images div2k_lr/ "
               "--out runs/audit_srflow\n"
               "  robustness-diag audit model.pth --budget thorough --device cuda\n"
               "exit code: 0 all audited and none failing, 1 some checkpoint failing or not auditable, 2 usage")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="checkpoints (.pth, .safetensors or bundled:<name>); none = both bundled flows")
    p.add_argument("--config", help="original YAML of the checkpoint(s) (overrides defaulted settings)")
    p.add_argument("--images", help="in-distribution LR images (folder or list file) for the OOD fit; default: "
                                    "crops of the scikit-image photos the bundled flows were trained on")
    p.add_argument("--from-hr", action="store_true", help="--images are HR: downscale them by the flow's scale")
    p.add_argument("--budget", choices=("fast", "standard", "thorough"), default="fast",
                   help="crops, samples, severities and attack steps (default fast: minutes on a laptop CPU)")
    p.add_argument("--out", default="runs/audit", help="report folder (default runs/audit)")
    p.add_argument("--heat", type=float, default=None,
                   help="sampling temperature (default: the checkpoint's own: 0.9 for the bundled and SRFlow flows, "
                        "0 for LLFlow, whose reference output is deterministic)")
    p.add_argument("--false-alarm", type=float, default=0.05,
                   help="false-alarm rate for the recommended OOD-score gate (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    p.add_argument("--restart", action="store_true", help="ignore finished work in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args) -> int:
    from robustness_diag.analyses.audit import AuditConfig, run
    from robustness_diag.devices import resolve_device
    from robustness_diag.reports.correlate_report import render

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < args.false_alarm < 1:
        print("error: --false-alarm must be in (0, 1)", file=sys.stderr)
        return EXIT_USAGE
    cfg = AuditConfig(checkpoints=args.checkpoints, config=args.config, images=args.images, from_hr=args.from_hr,
                      budget=args.budget, out=args.out, heat=args.heat, false_alarm=args.false_alarm, seed=args.seed,
                      device=str(device), resume=not args.restart, progress=not args.no_progress)
    res = run(cfg, render=render)
    for m in res.summaries:
        print(f"{m['name']} ({m['coupling']}): {m['verdict'].upper()}")
        for r in m["reasons"][:6]:
            print(f"  - {r}")
        thr = m.get("recommended_threshold", {})
        if thr.get("value") is not None:
            print(f"  gate: OOD score >= {thr['value']:.3g} "
                  f"({thr['false_alarm']:.1%} false alarms on the stress suite)")
    for f in res.failures:
        print(f"{f['checkpoint']}: NOT AUDITED: {f['error']}", file=sys.stderr)
    if res.report:
        print(f"wrote {res.report}")
    if res.failures and not res.summaries:
        return EXIT_USAGE                      # nothing could be audited: unreadable or unknown checkpoints
    failing = any(m["verdict"] == "failing" for m in res.summaries)
    return EXIT_FAILED if (res.failures or failing) else EXIT_OK
