"""Adversarial condition search: the LR input, within an L-infinity budget, that makes the flow's inverse explode.

Projected gradient ascent (sign steps, random start) on the LR image with the sampling latents held fixed. The
objective is a smooth maximum of the per-position inverse log-slopes of every coupling sub-transform along the
sampling pass (``"slope"``: log of 1/scale for affine couplings; the spline's inverse log-derivative), or a smooth
count of out-of-range output values (``"artifact"``). A budget of ``epsilon=1`` is the unconstrained variant: any
image in [0, 1].

For the affine coupling the inverse slope is at most ``1/eps`` (log 9.21 for eps 1e-4) per sub-transform, so a
search that drives the objective towards that bound has found an exploding input. The RQ-spline coupling's slope is
bounded by its derivative cap; the search should hit that bound and stay finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class AttackConfig:
    """``epsilon``: L-inf budget on the LR image in [0, 1] units (1.0 = unconstrained); ``steps``: ascent steps;
    ``step_size``: default ``2.5 * epsilon / steps`` (at least 1/255); ``objective``: "slope" or "artifact";
    ``heat``: latent std of the fixed latents; ``temperature``: of the smooth maximum (log-sum-exp)."""

    epsilon: float = 8 / 255
    steps: int = 20
    step_size: Optional[float] = None
    objective: str = "slope"
    heat: float = 0.9
    temperature: float = 1.0
    seed: int = 0


@dataclass
class AttackResult:
    """``lr``: the worst input found ``[B, 3, h, w]``; ``start_log_slope``/``best_log_slope``: per image ``[B]``, the
    largest inverse log-slope of the sampling pass at the clean input and at ``lr`` (same latents); ``history``: the
    mean objective per step."""

    lr: Tensor
    start_log_slope: Tensor
    best_log_slope: Tensor
    history: list = field(default_factory=list)
    config: Optional[AttackConfig] = None


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
        if flow.residual:
            x = x + flow.upsample(lr)
        x = torch.nan_to_num(x, nan=10.0, posinf=10.0, neginf=-10.0)
        obj = torch.sigmoid(((x - 0.5).abs() - 1.0) / 0.05).flatten(1).mean(1)
    else:
        raise ValueError(f"objective must be 'slope' or 'artifact', got {objective!r}")
    return obj, hard.detach()


def attack(flow, lr: Tensor, cfg: Optional[AttackConfig] = None, progress: bool = False) -> AttackResult:
    """Searches ``{lr' : |lr' - lr|_inf <= epsilon, 0 <= lr' <= 1}`` for the largest objective, per image.

    Arguments:
        flow: an SRFlow-family flow (eval mode; its parameters are not changed).
        lr: ``[B, 3, h, w]`` in [0, 1]; every image is attacked independently (the objective is per image).
        cfg: the search settings (default: ``AttackConfig()``).
        progress: a progress bar over the steps.
    """
    cfg = cfg or AttackConfig()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    was_training = flow.training
    flow.eval()
    req = [p.requires_grad for p in flow.parameters()]
    for p in flow.parameters():
        p.requires_grad_(False)
    try:
        latents = flow.draw_latents(lr, cfg.heat, g)
        step = cfg.step_size or max(2.5 * cfg.epsilon / max(cfg.steps, 1), 1 / 255)
        with torch.no_grad():
            _, start = _pass(flow, lr, latents, cfg.objective, cfg.temperature)
            delta = (torch.rand(lr.shape, generator=g) * 2 - 1).to(lr) * cfg.epsilon
            x = (lr + delta).clamp(0, 1)
        best_x, best_obj, best_slope = lr.clone(), torch.full_like(start, -math.inf), start.clone()
        history = []
        it = range(cfg.steps + 1)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="adversarial search", unit="step", leave=False)
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
        return AttackResult(best_x.detach(), start, best_slope, history, cfg)
    finally:
        for p, r in zip(flow.parameters(), req):
            p.requires_grad_(r)
        flow.train(was_training)
