r"""Instrumented sampling: exploding-inverse traces, artifact masks and explosion maps of one sampling pass.

:func:`trace_sampling` runs the ordinary reverse pass of an SRFlow-family flow (SRFlow, robustNF, NCSR, LLFlow) or
of an HCFlow (``flow.decode_with_ladj``) with a coupling tracer and a layer callback attached. The hooks only
*read* tensors, so the sample is bitwise the one that ``flow.sample`` gives for the same latents. Everything is
reduced on the device while sampling (no ``.item()``, no ``.cpu()``, no branching on tensor values); the small
per-layer record and the HR maps come back in one transfer when the caller asks (:meth:`TraceResult.cpu`,
:meth:`TraceResult.rows`).

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

import weakref
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor

from ..flows.base import Flow, SamplingPlan
from ..flows.layers import InvConv1x1

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


def _carry(x: Tensor, factor: int) -> Tensor:
    """Repeats every position of a map (N, h, w) over a ``factor x factor`` block: (N, h*factor, w*factor)."""
    if factor == 1:
        return x
    n, h, w = x.shape
    return x[:, :, None, :, None].expand(n, h, factor, w, factor).reshape(n, h * factor, w * factor)


def _absmax(z: Tensor) -> Tensor:
    """Max over channels of |z|, (N, C, H, W) -> (N, H, W); NaN propagates (abs + amax: far faster on CPU than
    ``vector_norm(ord=inf)``)."""
    return z.abs().amax(dim=1)


def _to_hr(maps: dict, h: int, empty: Tensor, combine) -> Tensor:
    """Combines per-level maps ``{level: (N, h/2**level, w/2**level)}`` on the HR grid (N, h, w) with ``combine``
    (``torch.add`` or ``torch.maximum``), carrying the running map to the next finer level each time; ``empty``
    (N, h, w) is returned when there are no maps."""
    out = None
    for level in sorted(maps, reverse=True):
        m = maps[level]
        out = m if out is None else combine(_carry(out, m.shape[-2] // out.shape[-2]), m)
    return empty if out is None else _carry(out, h // out.shape[-2])


def _nanmax(x: Tensor, fill: float) -> Tensor:
    """Max over all non-batch dims of (N, ...) with NaN replaced by ``fill``: (N,)."""
    return torch.nan_to_num(x, nan=fill).flatten(1).amax(dim=1)


def _move(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


@dataclass
class StageRecord:
    """Inverse log-slope statistics of one coupling sub-transform (stage "features", "std" or "self").

    Attributes:
        log_slope_max: max inverse log-slope over channels and positions, NaN ignored (-inf if all NaN), (N,).
        log_slope_max_map: max over channels of the element-wise inverse log-slope, (N, H_l, W_l), or None when
            ``keep_layer_maps`` is off. NaN where the sub-transform's input was NaN.
        log_slope_sum_map: sum over channels (this stage's inverse log-determinant per position), (N, H_l, W_l), or
            None.
    """

    log_slope_max: Tensor
    log_slope_max_map: Optional[Tensor] = None
    log_slope_sum_map: Optional[Tensor] = None

    def to(self, device) -> "StageRecord":
        return StageRecord(*(_move(getattr(self, f.name), device) for f in fields(self)))


@dataclass
class LayerRecord:
    """What one layer did during sampling (a small, fixed-size record: maps at the layer's own resolution).

    Attributes:
        index: reference layer index (``flowUpsamplerNet.layers[index]``; HCFlow: ``flow.flow.layers[index]``).
        name: human-readable name (:func:`layer_names`).
        kind: "squeeze", "step" (no coupling), "coupling" or "split".
        level: trace level (resolution HR / 2**level; a squeeze's output is at level - 1).
        act_max: max |activation| of the layer's output, NaN counted as +inf, (N,).
        growth: max per-position activation growth factor, NaN counted as +inf, (N,).
        act_max_map: max over channels of |output|, (N, H_out, W_out), or None.
        growth_map: per-position growth factor, (N, H_out, W_out), or None.
        stages: coupling sub-transforms in the order they ran (sampling order), name -> :class:`StageRecord`; for an
            HCFlow split, the couplings of its conditional flow (``"condFlow step k coupling"``).
    """

    index: int
    name: str
    kind: str
    level: int
    act_max: Tensor
    growth: Tensor
    act_max_map: Optional[Tensor] = None
    growth_map: Optional[Tensor] = None
    stages: dict = field(default_factory=dict)

    def to(self, device) -> "LayerRecord":
        return LayerRecord(self.index, self.name, self.kind, self.level, self.act_max.to(device),
                           self.growth.to(device), _move(self.act_max_map, device), _move(self.growth_map, device),
                           {k: v.to(device) for k, v in self.stages.items()})


@dataclass
class TraceResult:
    r"""Result of :func:`trace_sampling`; tensors stay on the sampling device until :meth:`cpu` / :meth:`rows`.

    ``N = n_samples * B``; row ``n`` is sample ``sample_index[n]`` of LR image ``image_index[n]``. ``H, W`` are the HR
    size. Slopes are natural logs of ``|dx/dy|`` (inverse direction); ``exp`` gives the factor.

    Attributes:
        image: final images (``flow.sample``'s output, before clamping), (N, 3, H, W), or None (``return_image``).
        artifact_mask: reference criterion per pixel, bool (N, H, W).
        nan_mask, inf_mask: a channel is NaN / +-Inf, bool (N, H, W).
        explosion_map: per-position inverse log-Jacobian of the whole pass carried to HR, nats, (N, H, W).
        slope_map: max inverse log-slope of any coupling sub-transform and channel covering the pixel, NaN ignored,
            (N, H, W) (-inf where every value was NaN).
        attribution: index of the first layer (sampling order) whose growth exceeded the threshold at the pixel,
            int64 (N, H, W), -1 for none.
        max_log_slope: max inverse log-slope over every sub-transform, channel and position, NaN ignored, (N,).
        ladj: ``log|det dx/d(latents)|`` of the pass as ``decode_with_ladj`` returns it, (N,).
        level_maps: level -> accumulated per-position inverse log-Jacobian at that level, (N, H/2**l, W/2**l);
            summed over positions and levels they give ``ladj``.
        layers: one :class:`LayerRecord` per layer, in sampling order.
        image_index, sample_index: int64 (N,).
        names: layer index -> human-readable name.
        settings: heat, thresholds and growth parameters used.
    """

    image: Optional[Tensor]
    artifact_mask: Tensor
    nan_mask: Tensor
    inf_mask: Tensor
    explosion_map: Tensor
    slope_map: Tensor
    attribution: Tensor
    max_log_slope: Tensor
    ladj: Tensor
    level_maps: dict
    layers: list
    image_index: Tensor
    sample_index: Tensor
    names: dict
    settings: dict

    # -- per-sample summaries (N,) ------------------------------------------------------------------------------
    @property
    def max_inverse_slope(self) -> Tensor:
        """Largest element-wise inverse slope ``|dx/dy|`` of any coupling sub-transform, (N,)."""
        return torch.exp(self.max_log_slope)

    @property
    def artifact_pixels(self) -> Tensor:
        """Number of artifact pixels per sample, int64 (N,)."""
        return self.artifact_mask.flatten(1).sum(dim=1)

    @property
    def artifact_fraction(self) -> Tensor:
        """Fraction of artifact pixels per sample, (N,)."""
        return self.artifact_mask.flatten(1).float().mean(dim=1)

    @property
    def nan_pixels(self) -> Tensor:
        """Number of pixels with a NaN channel per sample, int64 (N,)."""
        return self.nan_mask.flatten(1).sum(dim=1)

    @property
    def inf_pixels(self) -> Tensor:
        """Number of pixels with an infinite channel per sample, int64 (N,)."""
        return self.inf_mask.flatten(1).sum(dim=1)

    @property
    def explosion_max(self) -> Tensor:
        """Max of the explosion map per sample, NaN ignored (NaN if the whole map is NaN), nats, (N,)."""
        m = self.explosion_map.flatten(1)
        return torch.where(torch.isnan(m).all(dim=1), torch.nan, _nanmax(m, -_INF))

    @property
    def first_layer(self) -> Tensor:
        """Index of the first exploding layer of each sample (sampling order), int64 (N,), -1 for none."""
        return self.attribution.flatten(1).amax(dim=1)

    def first_layer_name(self, n: int) -> str:
        """Name of sample ``n``'s first exploding layer with its dominant stage, e.g. "level 2 step 3 coupling/self".

        The stage is the coupling sub-transform with the largest inverse log-slope in that layer; "" for none.
        """
        idx = int(self.first_layer[n])
        if idx < 0:
            return ""
        name = self.names[idx]
        rec = next((r for r in self.layers if r.index == idx), None)
        if rec is not None and rec.stages:
            best = max(rec.stages, key=lambda s: float(rec.stages[s].log_slope_max[n]))
            name = f"{name}/{best}"
        return name

    # -- transfer --------------------------------------------------------------------------------------------------
    def to(self, device) -> "TraceResult":
        """Moves every tensor to ``device`` (one transfer per tensor); returns a new result."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "layers":
                v = [r.to(device) for r in v]
            elif f.name not in ("names", "settings"):
                v = _move(v, device)
            kw[f.name] = v
        return TraceResult(**kw)

    def cpu(self) -> "TraceResult":
        """:meth:`to` the CPU."""
        return self.to("cpu")

    def rows(self) -> list[dict]:
        """One CSV-ready dict per (image, sample), in row order ``n``.

        Keys: image, sample, pixels, artifact_pixels, artifact_fraction, nan_pixels, inf_pixels, max_inverse_slope,
        max_log_inverse_slope, first_exploding_layer (-1 none), first_exploding_layer_name, explosion_map_max.
        """
        r = self.cpu()
        pixels = r.artifact_mask.shape[1] * r.artifact_mask.shape[2]
        cols = dict(image=r.image_index.tolist(), sample=r.sample_index.tolist(),
                    artifact_pixels=r.artifact_pixels.tolist(), artifact_fraction=r.artifact_fraction.tolist(),
                    nan_pixels=r.nan_pixels.tolist(), inf_pixels=r.inf_pixels.tolist(),
                    max_inverse_slope=r.max_inverse_slope.tolist(), max_log_inverse_slope=r.max_log_slope.tolist(),
                    first_exploding_layer=r.first_layer.tolist(), explosion_map_max=r.explosion_max.tolist())
        out = []
        for n in range(len(cols["image"])):
            row = {"image": cols["image"][n], "sample": cols["sample"][n], "pixels": pixels}
            for k in ("artifact_pixels", "artifact_fraction", "nan_pixels", "inf_pixels", "max_inverse_slope",
                      "max_log_inverse_slope", "first_exploding_layer"):
                row[k] = cols[k][n]
            row["first_exploding_layer_name"] = r.first_layer_name(n)
            row["explosion_map_max"] = cols["explosion_map_max"][n]
            out.append(row)
        return out


class _Recorder:
    """Hooks for ``decode_with_ladj``: per-stage and per-layer reductions, all on the device.

    With ``keep_layer_maps`` the hooks only reduce over channels (two ops per stage and per layer) and keep those
    small maps; growth, attribution, level sums and per-sample maxima are computed in :meth:`finish`, batched over
    the layers of one resolution. Without it, everything is folded into running maps inside the loop.
    """

    def __init__(self, plan: SamplingPlan, z_top: Tensor, growth_threshold: float, growth_floor: float,
                 keep_layer_maps: bool):
        self.plan = plan
        self.names = plan.layer_names()
        self.threshold = float(growth_threshold)
        self.floor = float(growth_floor)
        self.keep = keep_layer_maps
        self.top_a = _absmax(z_top)                                            # (N, h, w)
        self.records: list[LayerRecord] = []
        self.stages: dict[str, StageRecord] = {}
        self.split_logs: list[tuple[int, Tensor]] = []
        self.level_ladj: dict[int, Tensor] = {}
        self.level_slope: dict[int, Tensor] = {}
        # running state of the compact mode
        self.prev_a = self.top_a
        self.first1 = torch.zeros(self.top_a.shape, dtype=torch.long, device=z_top.device)

    def _accumulate(self, level: int, ladj_map: Tensor, slope_map: Optional[Tensor]) -> None:
        acc = self.level_ladj.get(level)
        self.level_ladj[level] = ladj_map if acc is None else acc + ladj_map
        if slope_map is not None:
            # NaN (the slope map of a NaN input) is ignored, like in the scalar summaries
            slope_map = torch.nan_to_num(slope_map, nan=-_INF)
            cur = self.level_slope.get(level)
            self.level_slope[level] = slope_map if cur is None else torch.maximum(cur, slope_map)

    def add_split_logs(self, level: int, logs: Tensor) -> None:
        """Adds a split prior's per-position log-scale sum (N, H_l, W_l) to the level's inverse log-Jacobian."""
        if self.keep:
            self.split_logs.append((level, logs))
        else:
            self._accumulate(level, logs, None)

    def tracer_factory(self, key):
        """A tracer for the coupling reported under ``key``; its stages belong to the next layer callback."""
        stages = self.stages
        plan = self.plan

        def tracer(stage: str, ladj: Tensor) -> None:
            level, stage = plan.stage(key, stage)
            mx = torch.amax(ladj, dim=1)          # (N, H_l, W_l)
            sm = ladj.sum(dim=1)
            if self.keep:
                stages[stage] = StageRecord(None, mx, sm)
            else:
                self._accumulate(level, sm, mx)
                stages[stage] = StageRecord(_nanmax(mx, -_INF))

        return tracer

    def layer_callback(self, index: int, layer, z: Tensor) -> None:
        a = _absmax(z)                                                         # (N, H_out, W_out)
        level = self.plan.level_of[index]
        logs = self.plan.split_logs(layer, z)
        if logs is not None:
            self.add_split_logs(level, logs)
        stages, self.stages = self.stages, {}
        if self.keep:
            self.records.append(LayerRecord(index, self.names[index], self.plan.kind(layer), level, None, None, a, None,
                                            stages))
            return
        prev = self.prev_a
        if prev.shape[-1] != a.shape[-1]:                                       # an unsqueeze: shapes, not values
            f = a.shape[-1] // prev.shape[-1]
            prev = _carry(prev, f)
            self.first1 = _carry(self.first1, f)
        g = a / prev.clamp(min=self.floor)
        # NaN growth counts as exploding. Layers run in decreasing index order, so the first exploding layer at a
        # position is the largest exploding index: a running max of (index + 1) where exploding, 0 elsewhere.
        self.first1 = torch.maximum(self.first1, (~(g <= self.threshold)) * (index + 1))
        self.prev_a = a
        # NaN kept here; finish() counts it as +inf
        self.records.append(LayerRecord(index, self.names[index], self.plan.kind(layer), level, a.flatten(1).amax(dim=1),
                                        g.flatten(1).amax(dim=1), None, None, stages))

    def finish(self) -> Tensor:
        """Completes the records and level maps after the pass; returns the attribution map (N, H, W), -1 = none.

        Per-sample maxima: NaN counts as +inf for activations and growth and is ignored for slopes."""
        if not self.keep:
            if self.records:
                n = len(self.records)
                both = torch.nan_to_num(torch.stack([r.act_max for r in self.records]
                                                    + [r.growth for r in self.records]), nan=_INF)
                for r, am, gr in zip(self.records, both[:n], both[n:]):
                    r.act_max, r.growth = am, gr
            return self.first1 - 1
        sums: dict[int, list] = {}
        stages: dict[int, list] = {}
        for r in self.records:
            for st in r.stages.values():
                sums.setdefault(r.level, []).append(st.log_slope_sum_map)
                stages.setdefault(r.level, []).append(st)
        for level, m in self.split_logs:
            sums.setdefault(level, []).append(m)
        self.level_ladj = {lv: torch.stack(v).sum(dim=0) for lv, v in sums.items()}
        for lv, sts in stages.items():                # one batch per level: slope map and per-stage maxima
            mx = torch.nan_to_num(torch.stack([st.log_slope_max_map for st in sts]), nan=-_INF)   # (k, N, H, W)
            self.level_slope[lv] = mx.amax(dim=0)
            per_stage = mx.flatten(2).amax(dim=2)                                                   # (k, N)
            for st, m in zip(sts, per_stage.unbind(0)):
                st.log_slope_max = m
        return self._growth_and_attribution()

    def _growth_and_attribution(self) -> Tensor:
        """Growth maps, per-sample maxima and the attribution map from the kept activation maps, one batch per run
        of consecutive layers at one resolution (their indices decrease by one in sampling order)."""
        prev, first = self.top_a, None
        recs, i = self.records, 0
        while i < len(recs):
            shape = recs[i].act_max_map.shape
            j = i
            while j < len(recs) and recs[j].act_max_map.shape == shape:
                j += 1
            group = recs[i:j]
            if prev.shape != shape:                                             # an unsqueeze: shapes, not values
                f = shape[-1] // prev.shape[-1]
                prev = _carry(prev, f)
                first = _carry(first, f) if first is not None else None          # (index + 1), 0 = none
            acts = torch.stack([prev] + [r.act_max_map for r in group])       # (k + 1, N, H, W)
            growth = acts[1:] / acts[:-1].clamp(min=self.floor)               # (k, N, H, W)
            exceed = ~(growth <= self.threshold)                               # NaN growth counts as exploding
            # the first exploding layer in sampling order has the largest index: max of (index + 1) where exploding
            plus1 = torch.arange(group[0].index + 1, group[-1].index, -1, device=acts.device, dtype=torch.int32)
            run_first = (exceed * plus1[:, None, None, None]).amax(dim=0)      # (N, H, W), 0 = none
            first = run_first if first is None else torch.maximum(first, run_first)
            scal = torch.nan_to_num(torch.stack([acts[1:].flatten(2).amax(dim=2),
                                                 growth.flatten(2).amax(dim=2)]), nan=_INF)   # (2, k, N)
            for r, gm, am, gr in zip(group, growth.unbind(0), scal[0].unbind(0), scal[1].unbind(0)):
                r.growth_map, r.act_max, r.growth = gm, am, gr
            prev, i = acts[-1], j
        if first is None:
            return torch.full(self.top_a.shape, -1, dtype=torch.long, device=self.top_a.device)
        return first.long() - 1

    @torch.no_grad()
    def constant_terms(self) -> dict[int, Tensor]:
        """Per level, the position-independent inverse log-det of the ActNorms and 1x1 convs (a 0-dim tensor).

        Grouped per level and 1x1 size (SRFlow: one size per level; HCFlow: the main steps' and the conditional
        flow's), cached per flow until one of those parameters changes (storage, dtype or in-place
        version)."""
        logs: dict[int, list] = {}
        weights: dict[int, dict] = {}                  # level -> 1x1 size -> weights
        for level, step in self.plan.constant_steps():
            logs.setdefault(level, []).append(step.actnorm.logs)
            if isinstance(step.invconv, InvConv1x1):
                weights.setdefault(level, {}).setdefault(step.invconv.weight.shape[0], []).append(step.invconv.weight)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for ps in (*logs.values(), *(
            w for ws in weights.values() for w in ws.values())) for p in ps)
        net = self.plan.net
        hit = _CONSTANTS.get(net)
        if hit is not None and hit[0] == key:
            return hit[1]
        out: dict[int, Tensor] = {}
        for level, parts in logs.items():
            c = -torch.cat([p.reshape(-1) for p in parts]).sum()
            for ws in weights.get(level, {}).values():
                # one matrix at a time: torch 2.13's CPU build (MKL) hangs in *batched* LU of 192 x 192 matrices
                # once torch.set_num_threads has changed the thread count; the result is cached, so this is cheap
                c = c - torch.stack([torch.linalg.slogdet(w)[1] for w in ws]).sum()
            out[level] = c
        _CONSTANTS[net] = (key, out)
        return out


#: the net owning the layers (flowUpsamplerNet, HCFlowNet) -> (parameter key, constant terms per level); entries
#: die with their flow.
_CONSTANTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
    rec = _Recorder(plan, plan.top(lr_rep, latents), growth_threshold, growth_floor, keep_layer_maps)
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
    explosion = _to_hr(level_maps, h, image.new_zeros(image.shape[0], h, w), torch.add)
    slope = _to_hr(rec.level_slope, h, torch.full_like(explosion, -_INF), torch.maximum)   # level maps: no NaN
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


__all__ = ["trace_sampling", "TraceResult", "LayerRecord", "StageRecord", "artifact_masks", "layer_names",
           "draw_sample_latents", "UPPER", "LOWER", "GROWTH_THRESHOLD", "GROWTH_FLOOR"]
