"""``robustness-diag audit``: run before deploying a conditional flow.

Static checks (what ``inspect`` reports plus the inverse slopes the conditioner produces on in-distribution inputs),
an OOD fit on in-distribution inputs, a stress suite of documented degradations at several severities, an adversarial
search (two objectives: the inverse slope and out-of-range output) with a best-of-N random baseline, and a verdict
with reasons and a recommended OOD-score threshold for gating inputs - all in OUT/report.html (+ audit.json,
metrics.json, CSVs). Verdicts, worst first: 'fails on clean inputs', 'exploding inverse' (non-finite output or an
inverse slope at the coupling's 1/eps bound), 'out-of-range artifacts' (more than 5% of a test's samples flagged by
the paper's per-image criterion: any pixel > 1.5, < -0.5 or non-finite), 'rare out-of-range artifacts', 'no
artifacts found' (with the upper bound of the rate); every reason gives its rate with N and interval.

Without CKPT it audits the two bundled 4X flows (affine and RQ-spline couplings) side by side.
Running again with the same --out resumes a half-finished audit: its cache is keyed by every setting the results
depend on (checkpoint digest, budget, heat, seed, device, ...), so a changed setting recomputes what it changes;
--overwrite (or --restart) starts over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustness_diag.devices import DEFAULT_DEVICE, DEVICE_HELP
from robustness_diag.exit_codes import EXIT_FAILED, EXIT_OK
from robustness_diag.text import printable

from . import options as opt
from .engine_args import add_engine_arguments, engine_error, engine_options
from .outputs import check_folder


def add_parser(sub) -> None:
    p = sub.add_parser(
        "audit", help="static, stress and adversarial audit of checkpoints with a verdict and an HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  robustness-diag audit                                 # bundled flows, ~3-6 min on 2 CPU cores\n"
               "  robustness-diag audit SRFlow_DF2K_4X.pth --config SRFlow_DF2K_4X.yml --images div2k_lr/ "
               "--out runs/audit_srflow\n"
               "  robustness-diag audit model.pth --budget thorough --device cuda\n"
               "exit codes: 0 all audited and none fails on clean inputs, 1 some checkpoint failing or not auditable "
               "(verdict 'fails on clean inputs'; unreadable, unknown layout: each named with its reason, the others "
               "audited), 2 usage or setup error (bad "
               "option, missing file or folder, unwritable --out; nothing audited)")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="checkpoints (.pth, .safetensors or bundled:<name>); none = both bundled flows")
    p.add_argument("--config", help="original YAML of the checkpoint(s) (overrides defaulted settings)")
    p.add_argument("--images", help="in-distribution LR images (folder or list file) for the OOD fit; default: "
                                    "crops of the scikit-image photos the bundled flows were trained on")
    p.add_argument("--from-hr", action="store_true", help="--images are HR: downscale them by the flow's scale")
    p.add_argument("--budget", choices=("fast", "standard", "thorough"), default="fast",
                   help="crops, samples, severities and attack steps (default fast: minutes on a laptop CPU)")
    p.add_argument("--out", default="runs/audit",
                   help="report folder (created; default runs/audit); existing results there are never replaced "
                        "silently: the audit resumes them (the default, --resume) unless --overwrite")
    p.add_argument("--heat", type=opt.non_negative, default=None,
                   help="sampling temperature (a number >= 0; default: the checkpoint's own: 0.9 for the bundled and "
                        "SRFlow flows, 0 for LLFlow, whose reference output is deterministic)")
    p.add_argument("--false-alarm", type=opt.probability, default=0.05,
                   help="false-alarm rate for the recommended OOD-score gate (in (0, 1); default 0.05)")
    p.add_argument("--seed", type=opt.seed, default=0, help=f"an integer in [0, {opt.MAX_SEED}] (default 0)")
    p.add_argument("--device", type=opt.device, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    r = p.add_mutually_exclusive_group()
    r.add_argument("--resume", dest="restart", action="store_false", default=False,
                   help="reuse finished work in --out (the default)")
    r.add_argument("--overwrite", "--restart", dest="restart", action="store_true",
                   help="ignore finished work in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from robustness_diag.analyses.audit import AuditConfig, run, settings_warning
    from robustness_diag.analyses.audit.report_data import gate_text
    from robustness_diag.analyses.audit.verdict import FAILS_ON_CLEAN
    from robustness_diag.devices import resolve_device
    from robustness_diag.reports.correlate_report import render

    prog = "robustness-diag audit"
    device = resolve_device(args.device)           # checked while parsing (options.device)
    missing = [c for c in args.checkpoints if not c.startswith("bundled:") and not Path(c).exists()]
    if missing:
        return opt.usage_error(f"{prog}: no such file: {', '.join(printable(m) for m in missing)}")
    for name, value in (("--config", args.config), ("--images", args.images)):
        if value is not None and not Path(value).exists():
            return opt.usage_error(f"{prog}: {name} {printable(value)}: no such file or folder")
    out_err = check_folder(args.out) or engine_error(args, prog)
    if out_err:
        return opt.usage_error(out_err if out_err.startswith(prog) else f"{prog}: {out_err}")
    cfg = AuditConfig(checkpoints=args.checkpoints, config=args.config, images=args.images, from_hr=args.from_hr,
                      budget=args.budget, out=args.out, heat=args.heat, false_alarm=args.false_alarm, seed=args.seed,
                      device=str(device), resume=not args.restart, progress=not args.no_progress,
                      engine=engine_options(args))
    from robustness_diag.analyses.engines import EngineError, check_cluster, session
    try:
        with session(cfg.engine):                  # one connection for every model; the stress conditions on Ray
            check_cluster(cfg.engine, cfg.device)
            res = run(cfg, render=render)
    except EngineError as e:                       # Ray missing, cluster unreachable, no worker for the device
        return opt.usage_error(f"{prog}: {e}")
    for m in res.summaries:
        print(f"{printable(m['name'])} ({m['coupling']}): {m['verdict'].upper()}")
        warning = settings_warning(m)
        if warning:
            print(f"  ! {printable(warning)}")
        print(f"  rule: {printable(m.get('rule', ''))}")
        for r in m["reasons"]:
            print(f"  - {printable(r)}")
        for c in m.get("caveats", []):
            print(f"  caveat: {printable(c)}")
        print(f"  gate: {printable(gate_text(m.get('recommended_threshold')))}")
    for f in res.failures:
        print(f"{printable(f['checkpoint'])}: NOT AUDITED: {printable(f['error'])}", file=sys.stderr)
    if res.report:
        print(f"wrote {printable(res.report)}")
    # a checkpoint that could not be audited is a failed input (exit 1), as in 'inspect', also when it is the only one
    failing = any(m["verdict"] == FAILS_ON_CLEAN for m in res.summaries)
    return EXIT_FAILED if (res.failures or failing) else EXIT_OK
