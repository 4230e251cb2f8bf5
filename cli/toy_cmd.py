"""``robustness-diag toy``: the mechanism on a 2-D toy, the paper's Fig. 3b.

Trains a conditional flow on R^2 with a scalar condition y (in distribution: |y| <= 1) once with affine and once
with RQ-spline couplings, samples them for in- and out-of-distribution y, and writes the per-layer sample variance
and the largest inverse slopes to OUT/toy_mechanism.json and OUT/toy_layer_variance.png (about 15 s on one core).
"""
from __future__ import annotations

import argparse

from robustness_diag.exit_codes import EXIT_CODES_HELP, EXIT_OK
from robustness_diag.text import printable

from . import options as opt
from .outputs import check_folder, overwrite_help, refuse_existing

#: what the toy study writes in --out
RESULT_FILES = ("toy_mechanism.json", "toy_layer_variance.png")


def add_parser(sub) -> None:
    p = sub.add_parser("toy", help="the exploding inverse on a 2-D toy (both couplings), JSON + figure",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXIT_CODES_HELP + ".\nexample:\n  robustness-diag toy --out runs/toy --seed 1   "
                              "# other seeds: other conditioners, the explosion may appear for one sign of y only")
    p.add_argument("--out", default="runs/toy", help="output folder (created; default runs/toy); " + overwrite_help())
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--seed", type=opt.seed, default=0,
                   help=f"training and sampling seed (an integer in [0, {opt.MAX_SEED}]; default 0)")
    p.add_argument("--steps", type=opt.positive_int, default=1000,
                   help="training steps per coupling (an integer >= 1; default 1000)")
    p.set_defaults(func=main)


def main(args) -> int:
    out_err = check_folder(args.out) or (None if args.overwrite else refuse_existing(args.out, RESULT_FILES))
    if out_err:
        return opt.usage_error(f"robustness-diag toy: {out_err}")
    from robustness_diag.analyses.toy_mechanism import ToyMechanismConfig, run
    from robustness_diag.reports.toy_figures import plot_layer_variance

    res = run(ToyMechanismConfig(out=args.out, seed=args.seed, steps=args.steps), plot=plot_layer_variance)
    for c, r in res.couplings.items():
        for y, row in r["conditions"].items():
            print(f"{c:9s} y={float(y):7.1f}  max inverse slope {row['max_inverse_slope']:10.3g}  "
                  f"max variance {row['max_variance']:10.3g}")
    print(f"wrote {printable(res.paths['json'])} and {printable(res.paths['figure'])}")
    return EXIT_OK
