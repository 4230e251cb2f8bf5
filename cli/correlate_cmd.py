"""``robustness-diag correlate`` and ``robustness-diag report``: does the OOD score predict where the flow breaks?

``correlate`` joins the output folders of ``score`` and ``sample`` (same images; several models give a
side-by-side) - or runs the 2-D toy with ``--toy`` - and writes ``report.html``, ``metrics.json`` and a CSV per
figure. ``report`` re-renders a finished folder from its sidecars (after a template or figure change).
"""
from __future__ import annotations

import argparse
import sys

from robustness_diag.exit_codes import EXIT_OK, EXIT_USAGE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "correlate", help="OOD score vs artifacts: statistics, figures and the HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  robustness-diag correlate runs/score_affine runs/sample_affine --out runs/corr\n"
               "  robustness-diag correlate runs/score_* runs/sample_* --out runs/corr   # models side by side\n"
               "  robustness-diag correlate --toy --out runs/toy_corr                   # the 2-D toy, ~40 s")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="output folders of 'score' and 'sample' (any order); paired by checkpoint")
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument("--toy", action="store_true", help="run the 2-D toy (both couplings) instead of run folders")
    p.add_argument("--grid", choices=("feature", "hr"), default="feature",
                   help="common grid: 'feature' (an LR-grid cell is an event if any HR pixel of its block is an "
                        "artifact; default) or 'hr' (score map upsampled to HR pixels)")
    p.add_argument("--bins", type=int, default=10, help="equal-count score bins of the reliability curve")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="image-bootstrap resamples (CIs)")
    p.add_argument("--false-alarm", type=float, default=0.05,
                   help="target false-alarm rate for the recommended score threshold (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap (and toy) seed")
    p.set_defaults(func=main_correlate)

    r = sub.add_parser("report", help="re-render report.html and figures of a correlate/audit folder",
                       description="Rebuild every figure and report.html from report_data.json in RUN_DIR.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.set_defaults(func=main_report)


def main_correlate(args) -> int:
    from robustness_diag.analyses import correlate as C

    if args.toy == bool(args.run_dirs):
        print("error: give RUN_DIR folders (from 'score' and 'sample') or --toy, not both or neither",
              file=sys.stderr)
        return EXIT_USAGE
    common = dict(out=args.out, n_bins=args.bins, n_resamples=args.bootstrap, false_alarm=args.false_alarm,
                  seed=args.seed)
    if args.toy:
        cfg = C.ToyCorrelateConfig(title="2-D toy: OOD score of the condition vs exploding inverse", **common)
    else:
        cfg = C.CorrelateConfig(run_dirs=list(args.run_dirs), grid=args.grid, **common)
    from robustness_diag.reports.correlate_report import rerender
    from robustness_diag.reports.html import metric_text

    res = C.run(cfg, render=rerender)
    if res.error:
        print(f"error: {res.error}", file=sys.stderr)
        return res.exit_code
    for name, m in res.metrics.items():
        print(f"{name}: AUROC {metric_text(m['auroc'])}; AP {metric_text(m['average_precision'])} "
              f"(prevalence {m['prevalence']['value']:.4f})")
    for name, counts in res.joins.items():
        left = {k: v for k, v in counts.items() if k != "joined" and v}
        if left:
            print(f"{name}: {counts['joined']} images in both runs; left out: "
                  + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in left.items()))
    print(f"wrote {res.report}")
    return res.exit_code


def main_report(args) -> int:
    from robustness_diag.reports.correlate_report import rerender

    try:
        path = rerender(args.run_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path}")
    return EXIT_OK
