"""``robustness-diag fit``: Gaussian statistics of a flow's conditioner features over in-distribution images.

Parses and validates the arguments into :class:`robustness_diag.analyses.fit.FitConfig`, calls ``run`` and sets the
exit code: 0 every image used, 1 some images failed (statistics still written from the others; none written when no
image could be used), 2 usage or setup error (missing checkpoint or folder, bad option).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustness_diag.devices import DEFAULT_DEVICE, DEVICE_HELP
from robustness_diag.exit_codes import EXIT_USAGE
from robustness_diag.ood import DEFAULT_BORDER_MARGIN, DEFAULT_CALIBRATION_FRACTION
from robustness_diag.text import printable

from . import options as opt
from .engine_args import add_engine_arguments, engine_error, engine_options
from .outputs import check_file, overwrite_help


def add_image_arguments(p: argparse.ArgumentParser, *, score: bool) -> None:
    """Options shared by fit and score: inputs, filters, input mode, tiling, device."""
    g = p.add_argument_group("inputs")
    g.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="folders (searched recursively), image files, or .txt/.lst file lists (one path per line); "
                        "PNG, JPEG, WebP, TIFF, BMP; 8/16-bit; gray and RGBA are converted to RGB (said in notes)")
    g.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files whose relative path or name matches (repeatable), e.g. '*.png'")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files (repeatable)")
    g.add_argument("--no-recursive", action="store_true", help="do not search sub-folders")
    hr = g.add_mutually_exclusive_group()
    hr.add_argument("--from-hr", dest="from_hr", action="store_true", default=None,
                    help="inputs are HR images: downscale them by the flow's scale (bicubic, anti-aliased)")
    if score:
        hr.add_argument("--from-lr", dest="from_hr", action="store_false",
                        help="inputs are LR images (default: whatever the statistics were fitted on)")
    g.add_argument("--max-pixels", type=opt.positive_int, default=50_000_000, metavar="N",
                   help="refuse files with more pixels than this (an integer >= 1; default 50,000,000)")
    g.add_argument("--min-size", type=opt.positive_int, default=8, metavar="PX",
                   help="refuse images whose LR side is shorter than this (an integer >= 1; default 8)")
    g.add_argument("--exif-orientation", action="store_true", help="apply EXIF orientation (ignored by default)")
    f = p.add_argument_group("features and tiling")
    if not score:
        f.add_argument("--level", dest="levels", action="append", metavar="NAME",
                       help="feature level to fit (repeatable; default fea_up1, the one at LR resolution; 4X flows "
                            "also have fea_up2 and fea_up0)")
        f.add_argument("--channels", metavar="SPEC", help="channel subset, e.g. '0:64' or '0:32,64:96' (default all)")
    else:
        f.add_argument("--level", dest="levels", action="append", metavar="NAME",
                       help="score only these fitted levels (repeatable; default all fitted levels)")
    f.add_argument("--tile", type=opt.positive_int, default=256, metavar="PX",
                   help="tile core size in LR pixels (an integer >= 1; default 256). Images whose area is at most "
                        "one tile window, (tile + 2 margin)^2, are processed whole; larger ones in overlapping "
                        "tiles. Peak memory ~ batch x (tile + 2 margin)^2 LR pixels of conditioner activations "
                        "(SRFlow: about 4.8 KB per LR pixel, 4.3 GB per 950-px window at the defaults)")
    f.add_argument("--margin", type=opt.non_negative_int, default=None, metavar="PX",
                   help="tile overlap in LR pixels (an integer >= 0; default: the flow's receptive field, e.g. 62 "
                        "for the bundled flows, 347 for SRFlow, which makes tiled results exact). A smaller margin "
                        "saves memory and time but is not exact"
                        + ("; score then measures and reports the error of every tiled image's map"
                           if score else ""))
    f.add_argument("--batch", type=opt.positive_int, default=1, metavar="N",
                   help="tiles per forward pass (an integer >= 1; default 1: memory grows with it)")
    f.add_argument("--border-margin", type=opt.non_negative_int, default=DEFAULT_BORDER_MARGIN, metavar="N",
                   help=(f"leave out positions closer than N to the image border from the image aggregates (mean, "
                         f"p95, p99, max, frac_above); their features see the conditioner's zero padding and score "
                         f"higher on clean images (an integer >= 0; default {DEFAULT_BORDER_MARGIN}, measured on "
                         f"the bundled flows; 0: every position; maps are written whole)") if score else
                        (f"when calibrating the threshold, leave out positions closer than N to the border, as score "
                         f"does (an integer >= 0; default {DEFAULT_BORDER_MARGIN})"))
    f.add_argument("--device", type=opt.device, default=DEFAULT_DEVICE, help=DEVICE_HELP)
    f.add_argument("--no-progress", action="store_true", help="no progress bar")


def missing_inputs(paths) -> list:
    """The ``--images`` entries that do not exist and do not name an image file: a missing folder or file list is a
    usage error (nothing could say what it held), while a missing image file becomes a failed row of the table and
    the other inputs are processed."""
    from robustness_diag.data.images import IMAGE_EXTENSIONS
    return [p for p in paths if not Path(p).exists() and Path(p).suffix.lower() not in IMAGE_EXTENSIONS]


def check_common(args, prog: str) -> str | None:
    """Returns a one-line usage-error message (controls escaped), or None. Numeric options were checked by their
    ``type=`` (:mod:`.options`) while parsing."""
    ck = args.checkpoint
    if not ck.startswith("bundled:") and not Path(ck).exists():
        return f"{prog}: checkpoint not found: {printable(ck)}"
    missing = missing_inputs(args.images)
    if missing:
        return f"{prog}: no such file or folder: {', '.join(printable(m) for m in missing)}"
    return None


def input_options(args):
    from robustness_diag.analyses.inputs import InputOptions
    return InputOptions(images=list(args.images), include=list(args.include), exclude=list(args.exclude),
                        recursive=not args.no_recursive, from_hr=args.from_hr, max_pixels=args.max_pixels,
                        min_size=args.min_size, exif_orientation=args.exif_orientation)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fit", help="fit Gaussian statistics of conditioner features on in-distribution images",
        description="Stream the conditioner features g(y) of every image through the flow's RRDB and fit one "
                    "Gaussian per feature level over all positions (float64, exact streaming merges), with OAS, "
                    "Ledoit-Wolf or relative-ridge shrinkage, and save them as a .safetensors statistics file that "
                    "records the checkpoint digest, level, channels, pixel count and shrinkage. A share of the "
                    "images (--calibration-fraction, every 5th by default) is held out of the Gaussian: their "
                    "per-position distances give the threshold of score's frac_above (the empirical 0.99 "
                    "quantile, stored with how it was obtained).",
        epilog="Exit codes: 0 all images used, 1 some images failed (listed; statistics written from the others), "
               "2 usage or setup error.\nExamples:\n"
               "  robustness-diag fit bundled:sr4x_affine --images train_lr/ --out stats.safetensors\n"
               "  robustness-diag fit SRFlow_DF2K_4X.pth --images hr/ --from-hr --shrinkage ledoit-wolf "
               "--out stats.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="flow checkpoint (.safetensors, .pth, or bundled:<name>)")
    p.add_argument("--out", required=True, metavar="FILE", help="statistics file to write (.safetensors); "
                   + overwrite_help())
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_image_arguments(p, score=False)
    s = p.add_argument_group("statistics")
    s.add_argument("--shrinkage", default="oas", choices=["oas", "ledoit-wolf", "ridge", "none"],
                   help="covariance shrinkage (default oas); singular covariances are handled and reported")
    s.add_argument("--ridge", type=opt.non_negative, default=1e-3, metavar="LAMBDA",
                   help="for --shrinkage ridge: add LAMBDA * trace(S)/D to the diagonal (a number >= 0; default 1e-3)")
    s.add_argument("--max-condition", type=opt.float_range(1.0, low_open=True), default=1e10, metavar="K",
                   help="floor eigenvalues at lambda_max/K if the covariance is worse conditioned (a number > 1; "
                        "default 1e10)")
    s.add_argument("--calibration-fraction", type=opt.float_range(0.0, 1.0, high_open=True),
                   default=DEFAULT_CALIBRATION_FRACTION, metavar="F",
                   help=f"share of the images held out of the Gaussian to calibrate the per-position threshold, "
                        f"chosen deterministically (inputs 0, 5, 10, ... in listing order for 0.2; at least one when "
                        f"there are two or more images); their interior distances' 0.99 quantile is stored as the "
                        f"threshold (a number in [0, 1); default {DEFAULT_CALIBRATION_FRACTION:g}; 0: no hold-out, "
                        f"the threshold is the chi quantile, which clean images exceed far more often than 1%%)")
    add_engine_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    err = (check_common(args, "robustness-diag fit") or check_file(args.out, overwrite=args.overwrite)
           or engine_error(args, "robustness-diag fit"))
    if err:
        return opt.usage_error(err if err.startswith("robustness-diag") else f"robustness-diag fit: {err}")
    from robustness_diag.analyses.fit import FitConfig, run
    cfg = FitConfig(checkpoint=args.checkpoint, out=args.out, inputs=input_options(args), levels=args.levels,
                    channels=args.channels, shrinkage=args.shrinkage, ridge=args.ridge,
                    max_condition=args.max_condition, tile=args.tile, margin=args.margin, batch=args.batch,
                    calibration_fraction=args.calibration_fraction, border_margin=args.border_margin,
                    device=args.device, progress=not args.no_progress, engine=engine_options(args))
    result = run(cfg)
    if result.exit_code == EXIT_USAGE:
        print(f"robustness-diag fit: {printable(result.error)}", file=sys.stderr)
    else:
        print(result.summary())
    return result.exit_code
