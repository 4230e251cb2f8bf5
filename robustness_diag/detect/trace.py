r"""Instrumented sampling: exploding-inverse traces, artifact masks and explosion maps of one sampling pass.

:func:`trace_sampling` runs the ordinary reverse pass of an SRFlow-family flow (SRFlow, robustNF, NCSR, LLFlow) or
of an HCFlow (``flow.decode_with_ladj``) with a coupling tracer and a layer callback attached. The hooks only
*read* tensors, so the sample is bitwise the one that ``flow.sample`` gives for the same latents. Everything is
reduced on the device while sampling (no ``.item()``, no ``.cpu()``, no branching on tensor values); the small
per-layer record and the HR maps come back in one transfer when the caller asks (:meth:`TraceResult.cpu`,
:meth:`TraceResult.rows`). The hooks are a :class:`~.recorder.Recorder`; the result types are in :mod:`.records`.

Quantities (``N = n_samples * B`` samples, ordered sample-major: row ``s * B + b`` is sample ``s`` of image ``b``):

* **inverse log-slope** of a coupling sub-transform ("features", "std", "self"): the element-wise
  ``log|dx/dy|`` the coupling computes anyway (``-log scale`` for affine, the spline's inverse log-derivative for the
  RQ spline), reduced over channels to a max map and a sum map ``[N, H_l, W_l]`` at the layer's resolution;
* **activation growth** of a layer at a position: ``max_c |z_out| / max(max_c |z_in|, growth_floor)``, with the input
  map carried to the output resolution (an unsqueeze repeats a position over its 2 x 2 block). A layer *explodes* at
  a position when the growth exceeds ``growth_threshold`` or is not finite;
* **attribution map** ``[N, H, W]``: index of the first layer *in sampling order* (highest index first) that
  exploded at the position covering each HR pixel, ``-1`` where none did;
* **explosion map** ``[N, H, W]`` in nats: the per-position inverse log-Jacobian of the whole pass (coupling
  sub-transforms, 1x1 convs, ActNorms and the split priors' ``exp(logs)``) accumulated per level and carried to HR:
  a value at level ``l`` (resolution ``HR / 2**l``) covers its ``2**l x 2**l`` HR block (nearest, not divided);
* **artifact mask** ``[N, H, W]``: the reference criterion on the final image (``flow.sample``'s output, before
  clamping): any channel ``> upper`` or ``< lower`` or non-finite; ``nan_mask``/``inf_mask`` likewise per pixel.

Levels are *trace levels*: resolution ``HR / 2**level``. For SRFlow-family flows they are the flow's own levels
(1..L); for HCFlow they are its 0-based levels plus one (HCFlow level 0, at HR/2, is trace level 1), so names and
maps mean the same for both. HCFlow specifics: the pass starts from the LR image (the growth of the first layer is
measured against ``|lr|``); a split samples its part ``a_l`` through the level's conditional flow, whose couplings
are recorded as *stages of the split* (``"condFlow step k coupling"``, k 1-based in reference order) and whose
ActNorms, 1x1 convs and prior ``logs`` enter the level's explosion map, so an explosion inside a conditional flow is
attributed to its split (``first_layer_name``: ``"level 1 split/condFlow step 2 coupling"``, the stage with the
largest inverse slope). HCFlow has no residual output.

References:
    Hong, Park & Chun, "On the Robustness of Normalizing Flows for Inverse Problems in Imaging", ICCV 2023,
    https://arxiv.org/abs/2212.04319
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..flows.base import Flow
from .recorder import Recorder, to_hr
from .records import TraceResult

#: Reference artifact thresholds (ARCHITECTURE.md): a channel above / below these values before clamping.
UPPER = 1.5
LOWER = -0.5
#: Default per-position activation growth factor above which a layer counts as exploding. Held-out in-distribution
#: crops grow by less than 5 per layer in both bundled flows, and the RQ-spline flow stays under this threshold on
#: every condition of the model cards' measurement set; one saturated affine sub-transform multiplies by up to 1e4.
GROWTH_THRESHOLD = 100.0
#: Activation magnitudes below this are treated as this value when forming growth ratios (units of the activation),
#: so a small value becoming an ordinary one is not called an explosion.
GROWTH_FLOOR = 1.0

_INF = float("inf")


def artifact_masks(image: Tensor, upper: float = UPPER, lower: float = LOWER) -> tuple[Tensor, Tensor, Tensor]:
    """Computes the per-pixel artifact, NaN and Inf masks of final images by the reference criterion.

    Arguments:
        image: final images x, (N, C, H, W), before clamping.
        upper, lower: a channel above ``upper`` or below ``lower`` marks the pixel.

    Returns:
        ``(artifact, nan, inf)``, each a bool tensor (N, H, W); ``artifact`` includes every non-finite pixel.
    """
    ok = (image <= upper) & (image >= lower)              # False for NaN and +-Inf as well
    return ~ok.all(dim=1), torch.isnan(image).any(dim=1), torch.isinf(image).any(dim=1)


def layer_names(flow: Flow) -> dict[int, str]:
    """Creates human-readable names of a flow's layers, keyed by the reference layer index
    (:meth:`SamplingPlan.layer_names`).

    Names: ``"level 2 squeeze"``, ``"level 2 pre-step 1"`` (a step without coupling), ``"level 2 step 3 coupling"``
    (the third coupling step of level 2, 1-based), ``"level 1 split"``. Levels are the trace levels (resolution
    ``HR / 2**level``): SRFlow's own levels, HCFlow's 0-based levels plus one. HCFlow's conditional-flow steps are
    stages of their level's split (:func:`trace_sampling`), not layers.
    """
    return flow.sampling_plan().layer_names()


def draw_sample_latents(flow: Flow, lr: Tensor, heat: float, n_samples: int,
                        generator: Optional[torch.Generator]) -> list[Tensor]:
    """Draws latents for ``n_samples`` samples of every LR image, sample-major (row ``s * B + b``).

    Sample ``s`` gets exactly the latents that the ``s``-th of ``n_samples`` successive ``flow.draw_latents(lr, heat,
    generator)`` calls gives, so ``n_samples=1`` reproduces ``flow.decode(lr, heat, generator)``.

    Returns:
        The flow's latent list (SRFlow family ``[eps_split_1, ..., z_top]``; HCFlow ``[eps_0, ..., eps_{L-1}]``, finest
        first), each (n_samples * B, C_k, H_k, W_k), on ``lr``'s device and dtype.
    """
    draws = [flow.draw_latents(lr, heat, generator) for _ in range(n_samples)]
    return [torch.cat(parts, dim=0) for parts in zip(*draws)] if n_samples > 1 else draws[0]


def replicate_inputs(flow, lr: Tensor, heat: Optional[float], n_samples: int, generator: Optional[torch.Generator],
                     latents: Optional[list], std: Optional[Tensor]) -> tuple[float, Tensor, Optional[Tensor], list]:
    """The inputs of ``n_samples`` samples per LR image in one batch, sample-major (row ``s * B + b``).

    Returns ``(heat, lr_rep, std_rep, latents)``: ``heat`` resolved (None -> ``flow.default_heat``), ``lr``
    (B, 3, h, w) repeated to (n_samples * B, ...), a per-image NCSR ``std`` map repeated likewise (a shared one is
    kept), and the latents: drawn by :func:`draw_sample_latents`, or the given ones after a shape check."""
    heat = flow.default_heat if heat is None else float(heat)
    b = lr.shape[0]
    lr_rep = lr.repeat(n_samples, 1, 1, 1) if n_samples > 1 else lr
    if std is not None and n_samples > 1 and std.shape[0] == b and b > 1:
        std = std.repeat(n_samples, 1, 1, 1)
    if latents is None:
        latents = draw_sample_latents(flow, lr, heat, n_samples, generator)
    else:
        latents = list(latents)
        flow.check_latents(lr_rep, latents)
    return heat, lr_rep, std, latents


@torch.no_grad()
def trace_sampling(flow: Flow, lr: Tensor, heat: Optional[float] = None, n_samples: int = 1,
                   generator: Optional[torch.Generator] = None, *, latents: Optional[list] = None,
                   std: Optional[Tensor] = None, upper: float = UPPER, lower: float = LOWER,
                   growth_threshold: float = GROWTH_THRESHOLD, growth_floor: float = GROWTH_FLOOR,
                   keep_layer_maps: bool = True, return_image: bool = True) -> TraceResult:
    r"""Computes one instrumented sampling pass: inverse slopes, activation growth, explosion and artifact maps.

    The output image is bitwise ``flow.sample(lr_rep, latents=latents)`` (the hooks only read), and for
    ``n_samples=1`` bitwise ``flow.sample(lr, heat, generator)``.

    Arguments:
        flow: any :class:`~robustness_diag.flows.base.Flow`, on the device and dtype of ``lr``.
        lr: LR images y, (B, 3, h, w) in [0, 1].
        heat: latent std (default ``flow.default_heat``); ignored when ``latents`` are given.
        n_samples: samples per LR image; rows are sample-major (``s * B + b``).
        generator: the only source of randomness (latents are drawn on its device, then moved: CPU and CUDA agree).
        latents: explicit latents for all ``N = n_samples * B`` rows, in the flow's order (SRFlow family
            ``[eps_split_1, ..., z_top]``, HCFlow ``[eps_0, ..., eps_{L-1}]``); then ``generator`` and ``heat`` are
            unused.
        std: NCSR std map, (B, 1 or 3, h', w') or None (HCFlow ignores it).
        upper, lower: artifact thresholds of the reference criterion.
        growth_threshold: per-position activation growth factor (dimensionless) above which a layer explodes.
        growth_floor: activation magnitude below which the growth denominator is clamped (activation units).
        keep_layer_maps: keep per-layer maps at each layer's resolution (the default, and the fastest: the hooks
            only reduce over channels and the rest is batched after the pass). ``False`` folds everything into
            running maps during the pass and keeps only per-sample scalars per layer: least memory, a little slower.
        return_image: keep the final images in the result.

    Returns:
        A :class:`TraceResult` whose tensors are on ``lr``'s device.

    Example:
        >>> import torch, robustness_diag as rd  # doctest: +SKIP
        >>> flow = rd.load_flow("bundled:sr4x_affine")  # doctest: +SKIP
        >>> r = rd.detect.trace_sampling(flow, torch.rand(1, 3, 16, 16), 0.9, 2,
        ...                              torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> r.artifact_mask.shape, sorted(r.rows()[0])[:3]  # doctest: +SKIP
        (torch.Size([2, 64, 64]), ['artifact_fraction', 'artifact_pixels', 'explosion_map_max'])
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    b = lr.shape[0]
    heat, lr_rep, std, latents = replicate_inputs(flow, lr, heat, n_samples, generator, latents, std)
    plan = flow.sampling_plan()
    rec = Recorder(plan, plan.top(lr_rep, latents), growth_threshold, growth_floor, keep_layer_maps)
    x, ladj = plan.decode(flow, lr_rep, heat, latents, std, rec.tracer_factory, rec.layer_callback,
                          rec.add_split_logs)
    image = flow.finish_sample(x, lr_rep)
    attribution = rec.finish()
    # -- the end of the pass: assemble the HR maps (still on the device) --------------------------------------------
    art, nan, inf = artifact_masks(image, upper, lower)
    h, w = image.shape[-2:]
    consts = rec.constant_terms()
    level_maps = {}
    for level in sorted(set(rec.level_ladj) | set(consts)):
        m = rec.level_ladj.get(level)
        if m is None:
            m = image.new_zeros(image.shape[0], h // 2 ** level, w // 2 ** level)
        level_maps[level] = m + consts.get(level, 0.0)
    # carried coarse to fine (each step doubles the resolution): a level-l value covers its 2**l x 2**l HR block
    explosion = to_hr(level_maps, h, image.new_zeros(image.shape[0], h, w), torch.add)
    slope = to_hr(rec.level_slope, h, torch.full_like(explosion, -_INF), torch.maximum)   # level maps: no NaN
    max_log = torch.stack([st.log_slope_max for r in rec.records for st in r.stages.values()]).amax(dim=0) \
        if any(r.stages for r in rec.records) else explosion.new_full((explosion.shape[0],), -_INF)
    dev = lr.device
    return TraceResult(
        image=image if return_image else None, artifact_mask=art, nan_mask=nan, inf_mask=inf,
        explosion_map=explosion, slope_map=slope, attribution=attribution,
        max_log_slope=max_log, ladj=ladj, level_maps=level_maps, layers=rec.records,
        image_index=torch.arange(b, device=dev).repeat(n_samples),
        sample_index=torch.arange(n_samples, device=dev).repeat_interleave(b),
        names=rec.names,
        settings=dict(heat=heat, n_samples=n_samples, upper=upper, lower=lower, growth_threshold=growth_threshold,
                      growth_floor=growth_floor, coupling=flow.config.coupling,
                      bound=flow.coupling_bound()))


__all__ = ["trace_sampling", "artifact_masks", "layer_names", "draw_sample_latents", "replicate_inputs", "UPPER",
           "LOWER", "GROWTH_THRESHOLD", "GROWTH_FLOOR"]
