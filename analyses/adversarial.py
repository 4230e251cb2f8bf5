"""Adversarial condition search: the LR input, within an L-infinity budget, that makes the flow's inverse explode or
its samples leave the valid range; and the random baseline of the same budget.

:func:`attack` is projected gradient ascent (sign steps, random start) on the LR image with the sampling latents held
fixed (drawn from ``cfg.seed``). Two objectives (:data:`OBJECTIVES`), each a per-image scalar:

* ``"slope"``: a smooth maximum (log-sum-exp) of the per-position inverse log-slopes of every coupling sub-transform
  along the sampling pass (log of 1/scale for affine couplings; the spline's inverse log-derivative) - it aims at
  the *exploding inverse*;
* ``"artifact"``: a smooth count (mean of sigmoids) of the output values outside the reference criterion's range
  (above 1.5 or below -0.5) - it aims at *out-of-range artifacts*, the paper's per-image flag.

A budget of ``epsilon=1`` is the unconstrained variant: any image in [0, 1]. :func:`random_search` is the baseline:
the best, per image and by the same objective on the same fixed latents, of ``draws`` random sign perturbations
``lr + epsilon * sign`` (clamped to [0, 1]); give it ``draws = AttackResult.evaluated`` so both have evaluated as
many candidates.

The slopes in :class:`AttackResult` are measured on the search's own fixed latents, which the search has tuned the
input to: quote slopes and artifact rates of a found input from a re-sampling with fresh latents (another seed), as
:func:`robustness_diag.analyses.audit.attack.measure_adversarial` does.

For the affine coupling the inverse slope is at most ``1/eps`` (log 9.21 for eps 1e-4) per sub-transform, so a
search that drives the slope towards that bound has found an exploding input. The RQ-spline coupling has no bound on
its local inverse slope (its knot-derivative floor and minimal bin widths allow slopes in the thousands: 3.3e3 was
measured on the bundled flow); what it bounds is the displacement of its inverse (``|x - (y - shift)|`` at most the
box width, :meth:`robustness_diag.flows.bijections.RQSpline2Bin.inverse_deviation_bound`), so its output stays
finite but can still leave the valid range.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

#: the search objectives: inverse slope (the exploding inverse) and out-of-range output (the paper's artifacts)
OBJECTIVES = ("slope", "artifact")


@dataclass
class AttackConfig:
    """``epsilon``: L-inf budget on the LR image in [0, 1] units (1.0 = unconstrained); ``steps``: ascent steps;
    ``step_size``: default ``2.5 * epsilon / steps`` (at least 1/255); ``objective``: one of :data:`OBJECTIVES`;
    ``heat``: latent std of the fixed latents; ``temperature``: of the smooth maximum (log-sum-exp); ``seed``: of
    the fixed latents (and of the random start; :func:`random_search` draws its perturbations from ``seed + 1``)."""

    epsilon: float = 8 / 255
    steps: int = 20
    step_size: Optional[float] = None
    objective: str = "slope"
    heat: float = 0.9
    temperature: float = 1.0
    seed: int = 0


@dataclass
class AttackResult:
    """``lr``: the worst input found ``[B, 3, h, w]``; ``start_log_slope`` / ``best_log_slope``: per image ``[B]``, the
    largest inverse log-slope of the sampling pass at the clean input and at ``lr``, **on the search's fixed latents**
    (not a fresh draw); ``start_objective`` / ``best_objective``: the objective per image ``[B]`` at the clean input
    and at ``lr`` (same latents); ``evaluated``: candidate inputs evaluated per image (the attack: ``steps + 1``
    iterates; the random search: its draws); ``history``: the mean objective per evaluated candidate."""

    lr: Tensor
    start_log_slope: Tensor
    best_log_slope: Tensor
    start_objective: Optional[Tensor] = None
    best_objective: Optional[Tensor] = None
    evaluated: int = 0
    history: list = field(default_factory=list)
    config: Optional[AttackConfig] = None


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _pass(flow, lr: Tensor, latents: list, objective: str, temperature: float) -> tuple[Tensor, Tensor]:
    """One differentiable sampling pass. Returns ``(objective [B], max inverse log-slope [B])``."""
    maps = []

    def tracer_factory(_i):
        def tracer(_stage, ladj):
            maps.append(ladj.amax(dim=1).flatten(1))   # [B, H*W] per-position max over channels
        return tracer

    x, _ = flow.decode_with_ladj(lr, latents=[z.clone() for z in latents], tracer_factory=tracer_factory)
    slopes = torch.nan_to_num(torch.cat(maps, dim=1), nan=-1e4, posinf=1e4)
    hard = slopes.amax(dim=1)
    if objective == "slope":
        obj = torch.logsumexp(slopes / temperature, dim=1) * temperature
    elif objective == "artifact":
        x = torch.nan_to_num(flow.finish_sample(x, lr), nan=10.0, posinf=10.0, neginf=-10.0)
        obj = torch.sigmoid(((x - 0.5).abs() - 1.0) / 0.05).flatten(1).mean(1)
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return obj, hard.detach()


@contextmanager
def _frozen(flow):
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    was_training = flow.training
    flow.eval()
    req = [p.requires_grad for p in flow.parameters()]
    for p in flow.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(flow.parameters(), req):
            p.requires_grad_(r)
        flow.train(was_training)


def attack(flow, lr: Tensor, cfg: Optional[AttackConfig] = None, progress: bool = False) -> AttackResult:
    """Searches ``{lr' : |lr' - lr|_inf <= epsilon, 0 <= lr' <= 1}`` for the largest objective, per image.

    Arguments:
        flow: an SRFlow-family flow (eval mode; its parameters are not changed).
        lr: ``[B, 3, h, w]`` in [0, 1]; every image is attacked independently (the objective is per image).
        cfg: the search settings (default: ``AttackConfig()``).
        progress: a progress bar over the steps.

    Returns the best of the ``cfg.steps + 1`` evaluated iterates per image (``AttackResult.evaluated``).
    """
    cfg = cfg or AttackConfig()
    _check_objective(cfg.objective)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with _frozen(flow):
        latents = flow.draw_latents(lr, cfg.heat, g)
        step = cfg.step_size or max(2.5 * cfg.epsilon / max(cfg.steps, 1), 1 / 255)
        with torch.no_grad():
            start_obj, start = _pass(flow, lr, latents, cfg.objective, cfg.temperature)
            delta = (torch.rand(lr.shape, generator=g) * 2 - 1).to(lr) * cfg.epsilon
            x = (lr + delta).clamp(0, 1)
        best_x, best_obj, best_slope = lr.clone(), torch.full_like(start, -math.inf), start.clone()
        history = []
        it = range(cfg.steps + 1)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"adversarial search ({cfg.objective})", unit="step", leave=False)
        for _ in it:
            x = x.detach().requires_grad_(True)
            obj, hard = _pass(flow, x, latents, cfg.objective, cfg.temperature)
            (grad,) = torch.autograd.grad(obj.sum(), x)
            with torch.no_grad():
                better = obj.detach() > best_obj
                sel = better.view(-1, 1, 1, 1)
                best_x = torch.where(sel, x.detach(), best_x)
                best_obj = torch.where(better, obj.detach(), best_obj)
                best_slope = torch.where(better, hard, best_slope)
                history.append(float(obj.detach().mean()))
                grad = torch.nan_to_num(grad)
                x = x + step * grad.sign()
                x = torch.minimum(torch.maximum(x, lr - cfg.epsilon), lr + cfg.epsilon).clamp(0, 1)
        return AttackResult(best_x.detach(), start, best_slope, start_obj.detach(), best_obj.detach(),
                            cfg.steps + 1, history, cfg)


def random_search(flow, lr: Tensor, cfg: Optional[AttackConfig] = None, draws: int = 1) -> AttackResult:
    """The random baseline of :func:`attack`: per image, the best of ``draws`` random sign perturbations
    ``clamp(lr + cfg.epsilon * s, 0, 1)`` (``s`` uniform in {-1, 1} per pixel and channel, drawn from
    ``cfg.seed + 1``) by ``cfg.objective`` on the same fixed latents as ``attack(flow, lr, cfg)``.

    ``cfg.steps``, ``step_size`` and ``temperature`` other than the objective's are unused. Pass ``draws`` equal to
    the attack's ``evaluated`` for a best-of-N baseline with the same number of candidates.
    """
    cfg = cfg or AttackConfig()
    _check_objective(cfg.objective)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    with _frozen(flow), torch.no_grad():
        latents = flow.draw_latents(lr, cfg.heat, g)
        start_obj, start = _pass(flow, lr, latents, cfg.objective, cfg.temperature)
        best_x, best_obj, best_slope = lr.clone(), torch.full_like(start, -math.inf), start.clone()
        history = []
        for _ in range(draws):
            sign = (torch.rand(lr.shape, generator=noise) < 0.5).to(lr) * 2 - 1
            x = (lr + cfg.epsilon * sign).clamp(0, 1)
            obj, hard = _pass(flow, x, latents, cfg.objective, cfg.temperature)
            better = obj > best_obj
            best_x = torch.where(better.view(-1, 1, 1, 1), x, best_x)
            best_obj = torch.where(better, obj, best_obj)
            best_slope = torch.where(better, hard, best_slope)
            history.append(float(obj.mean()))
        return AttackResult(best_x, start, best_slope, start_obj, best_obj, draws, history, cfg)


__all__ = ["OBJECTIVES", "AttackConfig", "AttackResult", "attack", "random_search"]
