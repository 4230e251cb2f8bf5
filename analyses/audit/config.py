"""What an audit is asked to do: :class:`AuditConfig`, the named budgets and the verdict thresholds.

A budget fixes the size of every stage (per model):

* ``images``: held-out HR photo crops per stress condition (LR side ``lr_size`` px, HR side ``lr_size * scale``),
  taken in turn from the four held-out source photos (so ``images / 4`` crops per source; the graphics condition
  has ``images`` synthetic images, each its own source);
* ``samples``: samples drawn per image and condition;
* ``levels``: degradation severities (1 = mild .. 3 = strong, see :mod:`robustness_diag.data.degradations`);
* ``fit_images``: in-distribution LR crops (side ``lr_size``, as in the stress suite) for the OOD fit when no
  ``images`` are given;
* ``attack_images`` / ``attack_steps``: clean LR crops attacked and projected-gradient steps per attack;
* ``bootstrap``: resamples of the source-image bootstrap behind every interval (at least 1000).

Verdict thresholds (log inverse slopes are natural logs of a dimensionless slope):
:data:`SMALL_BUDGET` is the L-inf adversarial budget in [0, 1] pixel units, :data:`NEAR_BOUND` the fraction of the
log bound that counts as reaching it, :data:`LARGE_BOUND` the smallest hard slope bound that is a danger to reach,
:data:`FLAG_RATE` the per-sample rate of the paper's per-image flag above which a test is out-of-range artifacts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from robustness_diag.devices import DEFAULT_DEVICE

from ..engines import EngineOptions

BUNDLED = ("bundled:sr4x_affine", "bundled:sr4x_rqspline")

BUDGETS = {
    "fast": dict(images=8, lr_size=24, samples=3, levels=(1, 3), fit_images=64, attack_images=4, attack_steps=8,
                 bootstrap=1000),
    "standard": dict(images=16, lr_size=32, samples=4, levels=(1, 2, 3), fit_images=128, attack_images=8,
                     attack_steps=20, bootstrap=2000),
    "thorough": dict(images=32, lr_size=48, samples=8, levels=(1, 2, 3), fit_images=256, attack_images=16,
                     attack_steps=50, bootstrap=5000),
}
#: the small adversarial budget: L-inf radius 8/255 on LR pixels in [0, 1]
SMALL_BUDGET = 8 / 255
#: "at the bound": a log inverse slope >= 99% of log(1/eps)
NEAR_BOUND = 0.99
#: Only a hard inverse-slope bound above this is a danger to reach (affine 1/eps = 1e4); smaller ones (HCFlow's atan
#: scale, 1.65 per coupling; the reparametrised affine, 1 + eps) are the coupling working as designed.
LARGE_BOUND = 100.0
#: "out-of-range artifacts": a degradation's or an 8/255 attack's per-sample rate of the paper's per-image flag (any
#: pixel > 1.5, < -0.5 or non-finite) above this (the point estimate; its interval is stated next to it)
FLAG_RATE = 0.05


@dataclass
class AuditConfig:
    """``checkpoints``: specs (.pth, .safetensors, ``bundled:<name>``; empty: :data:`BUNDLED`); ``config``: the
    original YAML; ``images`` (+ ``from_hr``): in-distribution images for the OOD fit; ``budget``: a key of
    :data:`BUDGETS`; ``out``: the report folder (resume cache under ``out/work/``); ``heat``: sampling temperature
    (None: each checkpoint's own, ``flow.default_heat``: 0.9 for the bundled and SRFlow flows, 0 for LLFlow, whose
    reference output is deterministic); ``false_alarm``: target rate of the recommended OOD gate; ``device``:
    ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`robustness_diag.devices.resolve_device`); ``resume``: reuse
    finished units in ``out/work/``; ``overrides``: entries replacing those of the chosen budget (e.g. a tiny setting
    for tests); ``engine``: where the stress conditions run (:class:`..engines.EngineOptions`: here, or as parallel
    Ray tasks with the same results)."""

    checkpoints: list = field(default_factory=list)
    config: Optional[str] = None
    images: Optional[str] = None
    from_hr: bool = False
    budget: str = "fast"
    out: str = "runs/audit"
    heat: Optional[float] = None
    false_alarm: float = 0.05
    seed: int = 0
    device: str = DEFAULT_DEVICE
    resume: bool = True
    progress: bool = True
    overrides: dict = field(default_factory=dict)
    engine: EngineOptions = field(default_factory=EngineOptions)


class AuditError(Exception):
    """A setup problem that stops the audit of one checkpoint (unreadable file, no images, ...)."""


def budget_of(cfg: AuditConfig) -> dict:
    """The effective budget: ``BUDGETS[cfg.budget]`` with ``cfg.overrides`` applied. Raises ValueError for an
    unknown budget name."""
    if cfg.budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {cfg.budget!r}")
    return {**BUDGETS[cfg.budget], **cfg.overrides}


def slug(spec: str) -> str:
    """A checkpoint spec as a file-name-safe model name (``bundled:sr4x_affine`` -> ``sr4x_affine``, a path -> its
    file name)."""
    s = str(spec).replace("bundled:", "")
    s = Path(s).name if not str(spec).startswith("bundled:") else s
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
