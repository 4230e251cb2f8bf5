"""The toy mechanism study: train the 2-D toy with both couplings, sample in- and out-of-distribution conditions,
and record the per-layer sample variance and inverse slopes (the paper's Fig. 3b), as JSON and a figure.

:func:`run` trains and samples in memory, then writes ``out/toy_mechanism.json`` once (atomically) and hands the
result to ``plot`` for ``out/toy_layer_variance.png``; it returns a :class:`ToyMechanismResult`.

``robustness-diag toy --out runs/toy`` (about 15 s on one CPU core).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from robustness_diag.flows.toy import train_toy
from robustness_diag.io import atomic_write_json


@dataclass
class ToyMechanismConfig:
    """``steps``: training steps per coupling; ``samples``: samples per condition; ``conditions``: the scalar
    conditions y (in distribution: |y| <= 1)."""

    out: str = "runs/toy"
    seed: int = 0
    steps: int = 1000
    samples: int = 2000
    conditions: list = field(default_factory=lambda: [0.0, 0.9, 3.0, 10.0, 30.0, -30.0, 100.0])


@dataclass
class ToyMechanismResult:
    """``couplings``: per coupling (``affine``, ``rqspline``) ``{"final_train_nll", "conditions": {str(y): row}}``,
    each row with the layer names, per-layer variance ``[layers, 2]``, the largest inverse log-slope and slope
    (dimensionless), the largest deviation from a translation and the largest variance; ``paths``: ``{"json",
    "figure"}`` files written (no figure without ``plot``)."""

    config: ToyMechanismConfig
    couplings: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What ``toy_mechanism.json`` holds: ``{"config", "couplings"}``."""
        return {"config": asdict(self.config), "couplings": self.couplings}


def run(cfg: ToyMechanismConfig, plot: Optional[Callable] = None) -> ToyMechanismResult:
    """Trains, samples and writes ``out/toy_mechanism.json``; ``plot(result_dict, path)`` draws
    ``out/toy_layer_variance.png`` (the CLI passes :func:`robustness_diag.reports.toy_figures.plot_layer_variance`)."""
    res = ToyMechanismResult(cfg)
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
        res.couplings[coupling] = {"final_train_nll": history[-1], "conditions": rows}
    out = Path(cfg.out)
    res.paths["json"] = atomic_write_json(out / "toy_mechanism.json", res.to_dict())
    if plot is not None:
        res.paths["figure"] = plot(res.to_dict(), out / "toy_layer_variance.png")
    return res
