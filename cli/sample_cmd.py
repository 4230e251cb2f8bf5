"""``robustness-diag sample``: sample a flow on image folders with exploding-inverse detection.

Per image and sample: artifact pixels (a channel > 1.5 or < -0.5 or non-finite, before clamping), NaN/Inf pixels,
the largest inverse slope of any coupling, the first layer whose activation exploded, and the explosion map (the
per-position inverse log-Jacobian of the whole pass at HR). Exit codes: 0 all images sampled, 1 some files failed
(listed), 2 usage or setup error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustness_diag.devices import DEFAULT_DEVICE, DEVICE_HELP
from robustness_diag.exit_codes import EXIT_USAGE
from robustness_diag.text import printable

from . import options as opt
from .engine_args import add_engine_arguments, engine_error, engine_options
from .fit_cmd import missing_inputs
from .outputs import check_folder, overwrite_help, refuse_existing


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="sample with exploding-inverse detection (per layer, per pixel)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="OUTDIR gets samples.csv (one row per image), sample_rows.csv (one row per image and sample), "
               "run.json, and with --save-maps maps/<name>.npz (masks, explosion and attribution maps, LR-grid "
               "event counts) plus PNG overlays; --save-samples writes the samples as PNG.\nExamples:\n"
               "  robustness-diag sample bundled:sr4x_affine --images lr/ --out runs/samp --samples 8 --save-maps\n"
               "  robustness-diag sample model.pth --images photos/ --from-hr --out runs/samp --resume")
    p.add_argument("checkpoint", metavar="CKPT", help="flow checkpoint (.safetensors, .pth, or bundled:<name>)")
    p.add_argument("--out", required=True, metavar="OUTDIR",
                   help="output folder (created); " + overwrite_help("continue its tables"))
    g = p.add_argument_group("inputs")
    g.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="folders (recursive), image files or .txt/.lst file lists; PNG, JPEG, WebP, TIFF, BMP")
    g.add_argument("--include", action="append", default=[], metavar="GLOB", help="only matching files (repeatable)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files (repeatable)")
    g.add_argument("--no-recursive", action="store_true", help="do not search sub-folders")
    g.add_argument("--from-hr", action="store_true", help="inputs are HR: downscale them by the flow's scale")
    g.add_argument("--max-pixels", type=opt.positive_int, default=50_000_000, metavar="N",
                   help="refuse larger files (an integer >= 1; default 50,000,000)")
    g.add_argument("--max-lr-pixels", type=opt.positive_int, default=512 * 512, metavar="N",
                   help="refuse LR images with more pixels (sampling is not tiled; an integer >= 1; default 262144)")
    g.add_argument("--min-size", type=opt.positive_int, default=8, metavar="PX",
                   help="refuse LR sides shorter than this (an integer >= 1; default 8)")
    g.add_argument("--exif-orientation", action="store_true", help="apply EXIF orientation")
    s = p.add_argument_group("sampling")
    s.add_argument("--samples", type=opt.positive_int, default=4, metavar="N",
                   help="samples per image (an integer >= 1; default 4)")
    s.add_argument("--heat", type=opt.non_negative, default=None,
                   help="latent std (a number >= 0; default: the checkpoint's own: 0.9 for the bundled and SRFlow "
                        "flows, 0 for LLFlow, whose reference output is deterministic)")
    s.add_argument("--seed", type=opt.seed, default=0,
                   help=f"base seed (an integer in [0, {opt.MAX_SEED}]); each image's seed also depends on its "
                        "file key")
    s.add_argument("--upper", type=opt.finite_float, default=1.5,
                   help="artifact threshold above (finite, above --lower; default 1.5)")
    s.add_argument("--lower", type=opt.finite_float, default=-0.5,
                   help="artifact threshold below (finite, below --upper; default -0.5)")
    s.add_argument("--device", type=opt.device, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    o = p.add_argument_group("outputs")
    o.add_argument("--save-maps", action="store_true", help="write maps/ (.npz masks and maps, PNG overlays)")
    o.add_argument("--save-samples", action="store_true", help="write samples/ (PNG, clamped to [0, 1])")
    r = o.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true", help="continue OUTDIR, skipping images already done")
    r.add_argument("--overwrite", action="store_true", help="replace existing tables in OUTDIR")
    o.add_argument("--retry-failed", action="store_true", help="with --resume: re-try files that failed")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    prog = "robustness-diag sample"
    err = None
    if not args.checkpoint.startswith("bundled:") and not Path(args.checkpoint).exists():
        err = f"{prog}: checkpoint not found: {printable(args.checkpoint)}"
    missing = missing_inputs(args.images)
    if not err and missing:
        err = f"{prog}: no such file or folder: {', '.join(printable(m) for m in missing)}"
    if not err:
        err = opt.check_order(prog, "--lower", args.lower, "--upper", args.upper)
    if not err and args.retry_failed and not args.resume:
        err = f"{prog}: --retry-failed needs --resume"
    err = err or engine_error(args, prog)
    if not err:
        out_err = check_folder(args.out) or (None if (args.resume or args.overwrite) else
                                             refuse_existing(args.out, ["samples.csv", "sample_rows.csv"],
                                                             resume=True))
        err = f"{prog}: {out_err}" if out_err else None
    if err:
        return opt.usage_error(err)
    from robustness_diag.analyses.sample import SampleConfig, run
    from robustness_diag.analyses.inputs import InputOptions
    from robustness_diag.reports.overlays import save_overlay

    inputs = InputOptions(images=list(args.images), include=list(args.include), exclude=list(args.exclude),
                          recursive=not args.no_recursive, from_hr=args.from_hr, max_pixels=args.max_pixels,
                          min_size=args.min_size, exif_orientation=args.exif_orientation)
    cfg = SampleConfig(checkpoint=args.checkpoint, out_dir=args.out, inputs=inputs, samples=args.samples,
                       heat=args.heat, seed=args.seed, upper=args.upper, lower=args.lower, save_maps=args.save_maps,
                       save_samples=args.save_samples, max_lr_pixels=args.max_lr_pixels, device=args.device,
                       resume=args.resume, retry_failed=args.retry_failed, overwrite=args.overwrite,
                       progress=not args.no_progress, overlay_writer=save_overlay, engine=engine_options(args))
    result = run(cfg)
    if result.exit_code == EXIT_USAGE:
        print(f"{prog}: {printable(result.error)}", file=sys.stderr)
    else:
        print(result.summary())
    return result.exit_code
