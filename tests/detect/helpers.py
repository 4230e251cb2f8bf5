"""Tiny synthetic flows for the detection tests (seconds on CPU)."""
from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import torch

import robustness_diag as rd
from robustness_diag.flows.bijections import Affine
from robustness_diag.flows.config import FlowConfig
from robustness_diag.flows.synthetic import randomize_flow

TINY = dict(nf=8, nb=2, gc=4, blocks=[0, 1], cond_channels=24, hidden=8, K=1, f_in=192, residual=True)
#: Layer plan of TINY (L=3, K=1, 2 pre-steps, split after level 1): 0 squeeze, 1-2 pre, 3 coupling, 4 split,
#: 5 squeeze, 6-7 pre, 8 coupling, 9 squeeze, 10-11 pre, 12 coupling.
COUPLINGS = {1: 3, 2: 8, 3: 12}

VARIANTS = {
    "affine": dict(coupling="affine", coupling_attr="affine"),
    "rqspline": dict(family="robustnf", coupling="rqspline", coupling_attr="rqspline", frozen_invconv=True),
    "affine_reparam": dict(family="robustnf", coupling="affine_reparam", coupling_attr="affinereparam"),
    "ncsr": dict(family="ncsr", coupling="affine", coupling_attr="affine", std_channels=3, S=1),
}


@functools.lru_cache(maxsize=None)
def _pristine(variant: str, seed: int):
    return randomize_flow(rd.build_flow(FlowConfig(**VARIANTS[variant], **TINY)), seed=seed)


def tiny_flow(variant: str = "affine", dtype=torch.float32, seed: int = 0):
    """A fresh copy (safe to patch) of a seeded tiny flow, in eval mode and ``dtype``."""
    return copy.deepcopy(_pristine(variant, seed)).to(dtype)


def lr_batch(b: int = 2, size: int = 8, dtype=torch.float32, seed: int = 0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def force_tiny_scale(flow, layer_index: int, row: int, col: int, scale: float) -> None:
    """Makes the ``features`` sub-transform of one affine coupling use ``scale`` in every channel at one position."""
    coupling = flow.flowUpsamplerNet.layers[layer_index].coupling
    original = coupling.make_bijection

    def patched(h, channels):
        bij = original(h, channels)
        if channels != coupling.channels:          # only the all-channel "features" stage
            return bij
        s = bij.scale.clone()
        s[:, :, row, col] = scale
        return Affine(bij.shift, s)

    coupling.make_bijection = patched


class Spy:
    """Wraps an element-wise bijection; records every ``inverse`` input."""

    def __init__(self, bij, log):
        self.bij, self.log = bij, log

    def inverse(self, y):
        self.log.append((self.bij, y.clone()))
        return self.bij.inverse(y)

    def forward(self, x):
        return self.bij.forward(x)


def spy_stage(flow, layer_index: int, stage_channels: int) -> list:
    """Records ``(bijection, input)`` of the coupling sub-transforms on ``stage_channels`` channels of one layer."""
    coupling = flow.flowUpsamplerNet.layers[layer_index].coupling
    original = coupling.make_bijection
    log: list = []

    def patched(h, channels):
        bij = original(h, channels)
        return Spy(bij, log) if channels == stage_channels else bij

    coupling.make_bijection = patched
    return log


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` of the checkout (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
