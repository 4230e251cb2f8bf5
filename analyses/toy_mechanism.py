"""The toy mechanism study: train the 2-D toy with both couplings, sample in- and out-of-distribution conditions,
and record the per-layer sample variance and inverse slopes (the paper's Fig. 3b), as JSON and a figure.

``robustness-diag toy --out runs/toy`` (about 15 s on one CPU core).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from robustness_diag.flows.toy import train_toy


@dataclass
class ToyMechanismConfig:
    out: str = "runs/toy"
    seed: int = 0
    steps: int = 1000
    samples: int = 2000
    conditions: list = field(default_factory=lambda: [0.0, 0.9, 3.0, 10.0, 30.0, -30.0, 100.0])


def run(cfg: ToyMechanismConfig, plot: Optional[Callable] = None) -> dict:
    """Returns (and writes to ``out/toy_mechanism.json``) per coupling and condition: per-layer variances, the
    largest inverse log-slope and deviation per coupling, and the final sample spread. ``plot(result, path)`` draws
    ``out/toy_layer_variance.png`` (the CLI passes :func:`robustness_diag.reports.toy_figures.plot_layer_variance`)."""
    result = {"config": asdict(cfg), "couplings": {}}
    for coupling in ("affine", "rqspline"):
        flow, history = train_toy(coupling, steps=cfg.steps, seed=cfg.seed)
        rows = {}
        for yv in cfg.conditions:
            _, tr = flow.sample(torch.full((cfg.samples, 1), float(yv)),
                                generator=torch.Generator().manual_seed(cfg.seed + 1))
            rows[str(yv)] = {
                "layers": tr["names"],
                "variance": tr["variance"].tolist(),
                "max_inverse_log_slope": float(tr["coupling_max_log_slope"].max()),
                "max_inverse_slope": math.exp(float(tr["coupling_max_log_slope"].max())),
                "max_deviation_from_translation": float(tr["coupling_max_deviation"].max()),
                "max_variance": float(tr["variance"].max()),
            }
        result["couplings"][coupling] = {"final_train_nll": history[-1], "conditions": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "toy_mechanism.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "toy_mechanism.json")
    if plot is not None:
        plot(result, out / "toy_layer_variance.png")
    return result
