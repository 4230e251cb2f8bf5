"""``robustness-diag toy``: the mechanism on a 2-D toy, the paper's Fig. 3b.

Trains a conditional flow on R^2 with a scalar condition y (in distribution: |y| <= 1) once with affine and once
with RQ-spline couplings, samples them for in- and out-of-distribution y, and writes the per-layer sample variance
and the largest inverse slopes to OUT/toy_mechanism.json and OUT/toy_layer_variance.png (about 15 s on one core).
"""
from __future__ import annotations

import argparse

from robustness_diag.exit_codes import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("toy", help="the exploding inverse on a 2-D toy (both couplings), JSON + figure",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  robustness-diag toy --out runs/toy --seed 1   # other seeds: other "
                              "conditioners, the explosion may appear for one sign of y only")
    p.add_argument("--out", default="runs/toy", help="output folder (default runs/toy)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per coupling (default 1000)")
    p.set_defaults(func=main)


def main(args) -> int:
    from robustness_diag.analyses.toy_mechanism import ToyMechanismConfig, run
    from robustness_diag.reports.toy_figures import plot_layer_variance

    res = run(ToyMechanismConfig(out=args.out, seed=args.seed, steps=args.steps), plot=plot_layer_variance)
    for c, r in res.couplings.items():
        for y, row in r["conditions"].items():
            print(f"{c:9s} y={float(y):7.1f}  max inverse slope {row['max_inverse_slope']:10.3g}  "
                  f"max variance {row['max_variance']:10.3g}")
    print(f"wrote {res.paths['json']} and {res.paths['figure']}")
    return EXIT_OK
