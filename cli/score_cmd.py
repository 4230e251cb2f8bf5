"""``robustness-diag score``: per-position Mahalanobis OOD maps and per-image scores for image folders.

Parses the arguments into :class:`robustness_diag.analyses.score.ScoreConfig` (with the overlay writer from
``robustness_diag.reports.overlays``), calls ``run`` and sets the exit code: 0 all images scored, 1 some failed
(listed), 2 usage or setup error (missing checkpoint/statistics, statistics from another checkpoint, existing output
without --resume/--overwrite).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustness_diag.exit_codes import EXIT_USAGE
from robustness_diag.text import printable

from . import options as opt
from .engine_args import add_engine_arguments, engine_error, engine_options
from .fit_cmd import add_image_arguments, check_common, input_options
from .outputs import check_folder, overwrite_help, refuse_existing


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="score images for OOD risk with fitted conditioner statistics",
        description="For every image: the Mahalanobis distance (not squared; higher = more out of distribution) of "
                    "the conditioner feature at each position from the fitted Gaussian, and image aggregates (mean, "
                    "p95, p99, max, fraction above the threshold) over the positions at least --border-margin from "
                    "the border. Tiling is exact by default (margin = the receptive field). OUTDIR gets scores.csv "
                    "(one row per image, written as produced, with an error column), run.json (config, versions, "
                    "timing, failures, threshold source, border margin, stitching) and, with --save-maps, maps/ (.npy "
                    "at the feature grid with every position, and colour-mapped PNG overlays at HR size).",
        epilog="Exit codes: 0 all images scored, 1 some files failed (listed), 2 usage or setup error.\nExamples:\n"
               "  robustness-diag score bundled:sr4x_affine --stats stats.safetensors --images test_lr/ --out runs/s1\n"
               "  robustness-diag score model.pth --stats s.safetensors --images list.txt --out runs/s1 --resume "
               "--save-maps",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="flow checkpoint (.safetensors, .pth, or bundled:<name>)")
    p.add_argument("--stats", required=True, metavar="FILE", help="statistics written by 'robustness-diag fit'")
    p.add_argument("--out", required=True, metavar="OUTDIR",
                   help="output folder (created); " + overwrite_help("continue its scores.csv"))
    add_image_arguments(p, score=True)
    o = p.add_argument_group("outputs")
    o.add_argument("--save-maps", action="store_true", help="write maps/ (.npy score maps and PNG overlays)")
    o.add_argument("--threshold", type=opt.non_negative, default=None, metavar="D",
                   help="distance threshold of frac_above (a number >= 0; default: the statistics' threshold, "
                        "calibrated at fit time as the 0.99 quantile of held-out in-distribution distances; "
                        "statistics without a calibration (older files) fall back to the chi 0.99 quantile, with a "
                        "warning)")
    o.add_argument("--map-range", type=opt.finite_float, nargs=2, default=None, metavar=("VMIN", "VMAX"),
                   help="colour scale of overlays, the same for every image (finite, VMIN < VMAX; default: median "
                        "in-distribution distance to twice the threshold)")
    o.add_argument("--overlay-max-side", type=opt.positive_int, default=2048, metavar="PX",
                   help="downsize larger overlay PNGs (an integer >= 1; default 2048)")
    o.add_argument("--float64", action="store_true", help="compute distances in float64")
    r = o.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true", help="continue OUTDIR/scores.csv, skipping files already in it")
    r.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR/scores.csv")
    o.add_argument("--retry-failed", action="store_true", help="with --resume: re-try files whose row is an error")
    add_engine_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    prog = "robustness-diag score"
    err = check_common(args, prog)
    if not err and not Path(args.stats).is_file():
        err = f"{prog}: statistics file not found: {printable(args.stats)}"
    if not err and args.map_range:
        err = opt.check_order(prog, "--map-range VMIN", args.map_range[0], "VMAX", args.map_range[1])
    if not err and args.retry_failed and not args.resume:
        err = f"{prog}: --retry-failed needs --resume"
    err = err or engine_error(args, prog)
    if not err:
        out_err = check_folder(args.out) or (None if (args.resume or args.overwrite)
                                             else refuse_existing(args.out, ["scores.csv"], resume=True))
        err = f"{prog}: {out_err}" if out_err else None
    if err:
        return opt.usage_error(err)
    from robustness_diag.analyses.score import ScoreConfig, run
    from robustness_diag.reports.overlays import save_overlay
    cfg = ScoreConfig(checkpoint=args.checkpoint, stats=args.stats, out_dir=args.out, inputs=input_options(args),
                      save_maps=args.save_maps, threshold=args.threshold, levels=args.levels,
                      map_range=tuple(args.map_range) if args.map_range else None,
                      overlay_max_side=args.overlay_max_side, compute_dtype="float64" if args.float64 else "float32",
                      tile=args.tile, margin=args.margin, batch=args.batch, border_margin=args.border_margin,
                      device=args.device, resume=args.resume,
                      retry_failed=args.retry_failed, overwrite=args.overwrite, progress=not args.no_progress,
                      overlay_writer=save_overlay, engine=engine_options(args))
    result = run(cfg)
    if result.exit_code == EXIT_USAGE:
        print(f"{prog}: {printable(result.error)}", file=sys.stderr)
    else:
        print(result.summary())
    return result.exit_code
