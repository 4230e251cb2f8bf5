"""``robustness-diag correlate`` and ``robustness-diag report``: does the OOD score predict where the flow breaks?

``correlate`` joins the output folders of ``score`` and ``sample`` (same images; several models give a
side-by-side) - or runs the 2-D toy with ``--toy`` - and writes ``report.html``, ``metrics.json`` and a CSV per
figure. ``report`` re-renders a finished folder from its sidecars (after a template or figure change).

Image level (always): per image, its score (the 'mean' column of scores.csv) against whether any of its samples
has an artifact (sample_rows.csv): AUROC, Spearman rho against the artifact fraction, and an image gate chosen on
half of the images and judged on the other half. The folders record no provenance, so every image counts as its own
independent source. Per position (when both runs were made with --save-maps): the score maps against the artifact
masks, added to the image level. Without maps the per-position analysis is skipped, said so, and the exit code is
still 0; with maps for some images only, it uses those images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustness_diag.exit_codes import EXIT_CODES_HELP, EXIT_OK
from robustness_diag.text import printable

from . import options as opt
from .outputs import check_folder, overwrite_help, refuse_existing

#: files whose presence means a folder holds correlate results
RESULT_FILES = ("metrics.json", "report_data.json", "report.html")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "correlate", help="OOD score vs artifacts: statistics, figures and the HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP + ".\nexamples:\n"
               "  robustness-diag correlate runs/score_affine runs/sample_affine --out runs/corr\n"
               "      (made without --save-maps: image level only; with it in both: per position too)\n"
               "  robustness-diag correlate runs/score_* runs/sample_* --out runs/corr   # models side by side\n"
               "  robustness-diag correlate --toy --out runs/toy_corr                   # the 2-D toy, ~40 s")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="output folders of 'score' and 'sample' (any order); paired by checkpoint. --save-maps "
                        "is optional: without maps the analysis is image level only")
    p.add_argument("--out", required=True, help="report folder (created); " + overwrite_help())
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--toy", action="store_true", help="run the 2-D toy (both couplings) instead of run folders")
    p.add_argument("--grid", choices=("feature", "hr"), default="feature",
                   help="common grid: 'feature' (an LR-grid cell is an event if any HR pixel of its block is an "
                        "artifact; default) or 'hr' (score map upsampled to HR pixels)")
    p.add_argument("--bins", type=opt.positive_int, default=10,
                   help="equal-count score bins of the reliability curve (an integer >= 1; default 10)")
    p.add_argument("--bootstrap", type=opt.positive_int, default=1000, metavar="N",
                   help="bootstrap resamples (of whole source images) for the confidence intervals (an integer >= "
                        "1; default 1000)")
    p.add_argument("--false-alarm", type=opt.probability, default=0.05,
                   help="target false-alarm rate of the image gate's threshold (and of the pooled per-position "
                        "one) (in (0, 1); default 0.05)")
    p.add_argument("--seed", type=opt.seed, default=0,
                   help=f"bootstrap (and toy) seed (an integer in [0, {opt.MAX_SEED}]; default 0)")
    p.set_defaults(func=main_correlate)

    r = sub.add_parser("report", help="re-render report.html and figures of a correlate/audit folder",
                       description="Rebuild every figure and report.html from report_data.json in RUN_DIR (they "
                                   "are replaced; the results, report_data.json and metrics.json, are only read).",
                       epilog=EXIT_CODES_HELP + ".")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.set_defaults(func=main_report)


def main_correlate(args) -> int:
    from robustness_diag.analyses import correlate as C

    prog = "robustness-diag correlate"
    if args.toy == bool(args.run_dirs):
        return opt.usage_error(f"{prog}: error: give RUN_DIR folders (from 'score' and 'sample') or --toy, not both "
                               f"or neither")
    out_err = check_folder(args.out) or (None if args.overwrite else refuse_existing(args.out, RESULT_FILES))
    if out_err:
        return opt.usage_error(f"{prog}: {out_err}")
    common = dict(out=args.out, n_bins=args.bins, n_resamples=args.bootstrap, false_alarm=args.false_alarm,
                  seed=args.seed)
    if args.toy:
        cfg = C.ToyCorrelateConfig(title="2-D toy: OOD score of the condition vs exploding inverse", **common)
    else:
        cfg = C.CorrelateConfig(run_dirs=list(args.run_dirs), grid=args.grid, **common)
    from robustness_diag.reports.correlate_report import rerender

    res = C.run(cfg, render=rerender)
    if res.error:
        print(f"{prog}: error: {printable(res.error)}", file=sys.stderr)
        return res.exit_code
    for name, m in res.metrics.items():
        print(f"{printable(name)}: " + "; ".join(summary_parts(m)))
    for name, counts in res.joins.items():
        m = res.metrics.get(name, {})
        at_image_level = "image_level" in m       # then images without maps are in it, not left out
        left = {k: v for k, v in counts.items() if k != "joined" and v and (k != "maps_missing" or not at_image_level)}
        if left:
            print(f"{printable(name)}: {counts['joined']} images in both runs; left out: "
                  + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in left.items()))
        if counts.get("maps_missing") and at_image_level and "per_position_unavailable" not in m:
            print(f"{printable(name)}: per-position statistics on {counts['joined'] - counts['maps_missing']} of "
                  f"{counts['joined']} images ({counts['maps_missing']} without maps; image level on all)")
    print(f"wrote {printable(res.report)}")
    return res.exit_code


def summary_parts(m: dict) -> list[str]:
    """What ``correlate`` prints of one model's metrics: the image-level AUROC (when computed), then the pooled
    per-position AUROC and AP, or why there are none (one line)."""
    from robustness_diag.reports.html import metric_text

    parts = []
    il = m.get("image_level")
    if il:
        parts.append(f"image-level AUROC {metric_text(il['auroc'])} ({il['n_images']} images, "
                     f"{il['n_positive_images']} with artifacts)")
    if "per_position_unavailable" in m:
        parts.append(f"per-position statistics not available: {printable(m['per_position_unavailable'])}")
    else:
        parts.append(f"{'pooled per-position ' if il else ''}AUROC {metric_text(m['auroc'])}; AP "
                     f"{metric_text(m['average_precision'])} (prevalence {m['prevalence']['value']:.4f})")
    return parts


def main_report(args) -> int:
    from robustness_diag.reports.correlate_report import rerender

    prog = "robustness-diag report"
    if not Path(args.run_dir).is_dir():
        return opt.usage_error(f"{prog}: RUN_DIR {printable(args.run_dir)}: no such folder")
    out_err = check_folder(args.run_dir, option="RUN_DIR")
    if out_err:
        return opt.usage_error(f"{prog}: {out_err}")
    try:
        path = rerender(args.run_dir)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e) if str(args.run_dir) in str(e) else f"{args.run_dir}: {e}"
        return opt.usage_error(f"{prog}: error: {msg}")
    print(f"wrote {printable(path)}")
    return EXIT_OK
