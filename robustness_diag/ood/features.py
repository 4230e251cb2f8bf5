r"""Conditioner features of a flow, tiled and padded, streamed into a fit or turned into distance maps.

Levels are the reference feature keys of :data:`robustness_diag.flows.rrdb.LEVEL_TO_NAME`: ``fea_up1`` is at LR
resolution for every scale (the default level), ``fea_up2``/``fea_up4``/... at 2x/4x/... LR, ``fea_up0`` at LR/2.
Each holds ``cond_channels`` channels (the level feature plus the stacked trunk blocks; 320 for SRFlow, 160 for the
bundled flows); a channel subset can be chosen.

Images of any size: the LR image ``[1, 3, h, w]`` is padded (bottom/right, replicate) to the multiple the flow needs,
cut into overlapping tiles (:mod:`robustness_diag.data.tiling`), and outputs are cropped back to the ``h x w`` input
(``ceil(h*r) x ceil(w*r)`` positions at a level of ratio ``r``). With ``margin >= receptive_field(flow, levels)`` the
stitched features equal the whole-image features; the default margin is that radius, capped at
:data:`MAX_AUTO_MARGIN` LR pixels (deep RRDBs have a theoretical radius of several hundred pixels but a much smaller
effective one; ``stitch_exact`` in :meth:`FeatureExtractor.describe` says whether the cap was hit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..flows.base import Flow
from ..data.tiling import crop_to, iter_tiled, pad_to_multiple, plan_tiles, tiled_map
from .errors import NonFiniteStatisticsError
from .gaussian import GaussianAccumulator
from .scorer import NONFINITE_CAUSE, MahalanobisScorer

DEFAULT_LEVEL = "fea_up1"
MAX_AUTO_MARGIN = 96
DEFAULT_TILE = 256


def _parse_ratio(level: str) -> float:
    if not level.startswith("fea_up"):
        raise ValueError(f"unknown feature level {level!r} (expected fea_up0, fea_up1, fea_up2, ...)")
    k = int(level[len("fea_up"):])
    return 0.5 if k == 0 else float(k)


def feature_levels(flow: Flow) -> dict[str, float]:
    """The flow's conditioning feature levels, finest first: ``{name: resolution / input resolution}``
    (:meth:`Flow.feature_levels`; 4X SR: ``fea_up2`` 2, ``fea_up1`` 1, ``fea_up0`` 0.5)."""
    return flow.feature_levels()


def feature_channels(flow: Flow) -> int:
    """Channels of every feature level (:meth:`Flow.feature_channels`)."""
    return flow.feature_channels()


def level_ratio(level: str, flow=None) -> float:
    """Resolution of a level relative to the flow's input image. With ``flow``: from :func:`feature_levels`;
    without: the SR naming rule (``fea_up{k}`` -> ``k`` for ``k >= 1``, ``fea_up0`` -> 0.5)."""
    if flow is None:
        return _parse_ratio(level)
    levels = feature_levels(flow)
    if level not in levels:
        raise ValueError(f"feature level {level!r} is not used by this flow; choose from {', '.join(levels)}")
    return levels[level]


def available_levels(flow) -> list[str]:
    """Feature levels the flow's couplings use, finest first (4X SR: ``fea_up2``, ``fea_up1``, ``fea_up0``)."""
    return list(feature_levels(flow))


def default_level(flow: Flow) -> str:
    """The level closest to the input resolution (finer on ties; :meth:`Flow.default_feature_level`)."""
    return flow.default_feature_level()


def resolve_levels(flow, levels: Optional[Sequence[str]]) -> list[str]:
    """Validates ``levels`` (None -> ``[default_level(flow)]``); unknown names raise ValueError naming the choices."""
    avail = available_levels(flow)
    if not levels:
        return [default_level(flow)]
    out = []
    for lv in levels:
        if lv not in avail:
            raise ValueError(f"feature level {lv!r} is not used by this {flow.scale}X {flow.family} flow; "
                             f"choose from {', '.join(avail)}")
        if lv not in out:
            out.append(lv)
    return out


def parse_channels(spec, n_channels: int) -> Optional[list[int]]:
    """Channel selection: None/""/"all" -> None (all); ``"0:64,100,120:130"`` (Python slices, end exclusive) or a
    sequence of ints -> sorted unique indices in ``[0, n_channels)``. Raises ValueError naming the bad part."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    idx: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ":" in part:
                    a, b = part.split(":", 1)
                    idx += list(range(int(a) if a else 0, int(b) if b else n_channels))
                else:
                    idx.append(int(part))
            except ValueError:
                raise ValueError(f"bad channel selection {part!r} (use e.g. 0:64,100,120:130)") from None
    else:
        idx = [int(i) for i in spec]
    bad = [i for i in idx if not 0 <= i < n_channels]
    if bad:
        raise ValueError(f"channel indices {bad[:5]} out of range: the level has {n_channels} channels")
    out = sorted(set(idx))
    if not out:
        raise ValueError("empty channel selection")
    return None if out == list(range(n_channels)) else out


def lr_alignment(flow: Flow, levels: Sequence[str]) -> int:
    """Input sizes and tile offsets must be multiples of this: the flow's :meth:`Flow.input_alignment`, and ``1/r``
    for a level of ratio ``r < 1``."""
    need = flow.input_alignment()
    for lv in levels:
        r = level_ratio(lv, flow)
        if r < 1:
            k = int(round(1 / r))
            need = need * k // math.gcd(need, k)
    return max(1, need)


def receptive_field(flow: Flow, levels: Sequence[str]) -> int:
    """Receptive-field radius in input pixels of the conditioner features at ``levels`` (counted 3x3 convs; each
    family documents its count in :meth:`Flow.receptive_field`)."""
    return flow.receptive_field(levels)


def conditioner_features(flow: Flow, lr: torch.Tensor, levels: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{level: [B, C, h*r, w*r]}`` for the input ``lr`` ``[B, 3, h, w]`` (or its preprocessed form); equals
    ``flow.features(lr)`` on those levels but computes only what they need (no check of the size: pad first).
    Preprocessing (:meth:`Flow.condition_input`) may be global (LLFlow's histogram equalisation): tiled callers
    preprocess the whole image first and pass the result, which is left as it is."""
    return flow.conditioner_features(flow.condition_input(lr), levels)


@dataclass
class FeatureOptions:
    """How features are taken from images.

    Attributes:
        levels: feature levels (None: the LR-resolution level ``fea_up1``).
        channels: channel subset (see :func:`parse_channels`), applied to every level.
        tile: core tile size in LR pixels (images up to this size are one piece).
        margin: overlap in LR pixels on each side of a tile (None: receptive field, capped at ``MAX_AUTO_MARGIN``).
        batch: tiles per forward pass (memory ~ batch x (tile + 2 margin)^2 x channels).
        pad_mode: padding of odd sizes ("replicate", "reflect", "constant").
    """

    levels: Optional[Sequence[str]] = None
    channels: object = None
    tile: int = DEFAULT_TILE
    margin: Optional[int] = None
    batch: int = 2
    pad_mode: str = "replicate"


class FeatureExtractor:
    """Binds a flow and :class:`FeatureOptions`: padded, tiled feature extraction for one LR image at a time.

    Arguments:
        flow: any :class:`~robustness_diag.flows.base.Flow`; used in eval mode, no grad.
        options: :class:`FeatureOptions`.
    """

    def __init__(self, flow, options: Optional[FeatureOptions] = None):
        self.flow = flow
        self.options = opts = options or FeatureOptions()
        self.levels = resolve_levels(flow, opts.levels)
        self.n_channels = feature_channels(flow)
        self.channels = parse_channels(opts.channels, self.n_channels)
        self.align = lr_alignment(flow, self.levels)
        self.ratios = {lv: level_ratio(lv, flow) for lv in self.levels}
        self.rf = receptive_field(flow, self.levels)
        self.margin = int(opts.margin) if opts.margin is not None else min(self.rf, MAX_AUTO_MARGIN)
        self.tile = max(int(opts.tile), self.align)
        self._ch_index = None

    @property
    def dim(self) -> int:
        return len(self.channels) if self.channels is not None else self.n_channels

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    def describe(self) -> dict:
        """JSON-ready settings (recorded in statistics files and run.json)."""
        return {"levels": self.levels, "channels": self.channels, "n_channels_total": self.n_channels,
                "tile": self.tile, "margin": self.margin, "batch": int(self.options.batch),
                "pad_mode": self.options.pad_mode, "alignment": self.align, "receptive_field": self.rf,
                "stitch_exact": self.margin >= self.rf}

    def _select(self, f: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return f
        if self._ch_index is None or self._ch_index.device != f.device:
            self._ch_index = torch.as_tensor(self.channels, dtype=torch.long, device=f.device)
        return f.index_select(1, self._ch_index)

    def _prepare(self, lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if lr.dim() == 3:
            lr = lr[None]
        if lr.dim() != 4 or lr.shape[0] != 1 or lr.shape[1] != 3:
            raise ValueError(f"expected one LR image [1, 3, h, w] or [3, h, w], got {tuple(lr.shape)}")
        p = next(self.flow.parameters())
        lr = lr.to(device=p.device, dtype=p.dtype)
        x, size = pad_to_multiple(lr, self.align, self.options.pad_mode)
        x = self.flow.condition_input(x)            # global preprocessing (LLFlow) before tiling
        return x, size

    def _tiles(self, hp: int, wp: int):
        return plan_tiles(hp, wp, self.tile, self.margin, self.align)

    @torch.no_grad()
    def iter_vectors(self, lr: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        """Yields, tile by tile, ``{level: [n, D]}`` feature vectors (selected channels) at the positions of the
        unpadded image, each position exactly once. For streaming fits: memory is bounded by one tile batch."""
        x, (h, w) = self._prepare(lr)
        valid = {lv: (math.ceil(h * r - 1e-9), math.ceil(w * r - 1e-9)) for lv, r in self.ratios.items()}

        def fn(win):
            return conditioner_features(self.flow, win, self.levels)

        for t, parts in iter_tiled(x, fn, self._tiles(*x.shape[-2:]), self.ratios, self.options.batch):
            out = {}
            for lv, f in parts.items():
                r = self.ratios[lv]
                oy, ox = int(round(t.y0 * r)), int(round(t.x0 * r))
                vh, vw = valid[lv]
                f = f[..., :max(0, vh - oy), :max(0, vw - ox)]
                f = self._select(f)
                out[lv] = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            yield out

    @torch.no_grad()
    def features(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stitched whole-image features ``{level: [1, D, ceil(h*r), ceil(w*r)]}`` (selected channels). Memory grows
        with the image: for inspection and tests; scoring uses :meth:`distance_maps`."""
        x, size = self._prepare(lr)

        def fn(win):
            return {k: self._select(v) for k, v in conditioner_features(self.flow, win, self.levels).items()}

        out = tiled_map(x, fn, tile=self.tile, margin=self.margin, ratios=self.ratios, align=self.align,
                        batch=self.options.batch)
        return {k: crop_to(v, size, self.ratios[k]) for k, v in out.items()}

    @torch.no_grad()
    def distance_maps(self, lr: torch.Tensor, scorer: MahalanobisScorer) -> dict[str, torch.Tensor]:
        """Per-position Mahalanobis distance maps ``{level: [ceil(h*r), ceil(w*r)]}`` (float32, on the flow's
        device) for one LR image ``[1, 3, h, w]``, tiled and stitched."""
        missing = [lv for lv in self.levels if lv not in scorer.levels]
        if missing:
            raise ValueError(f"the statistics hold no fit for level(s) {', '.join(missing)} "
                             f"(fitted: {', '.join(scorer.level_names)})")
        x, size = self._prepare(lr)

        def fn(win):
            feats = conditioner_features(self.flow, win, self.levels)
            return {k: scorer.levels[k].distance_map(v, scorer.compute_dtype)[:, None].float()
                    for k, v in feats.items()}

        out = tiled_map(x, fn, tile=self.tile, margin=self.margin, ratios=self.ratios, align=self.align,
                        batch=self.options.batch)
        return {k: crop_to(v, size, self.ratios[k])[0, 0] for k, v in out.items()}


def make_accumulators(extractor: FeatureExtractor) -> dict[str, GaussianAccumulator]:
    """One empty float64 accumulator per level of ``extractor``, on the flow's device."""
    return {lv: GaussianAccumulator(extractor.dim, device=extractor.device) for lv in extractor.levels}


def accumulate(extractor: FeatureExtractor, accs: Mapping[str, GaussianAccumulator], lr: torch.Tensor) -> int:
    """Streams the features of one LR image ``[1, 3, h, w]`` into ``accs``; returns the number of positions added
    at the first level.

    Raises :class:`~.errors.NonFiniteStatisticsError` when any feature value of the image is NaN/Inf (naming the
    level, how many values and positions, and the likely cause); ``accs`` are then left as they were before the
    image, so one such image never poisons the statistics."""
    n = 0
    first = extractor.levels[0]
    saved = {lv: acc.snapshot() for lv, acc in accs.items()}
    counts = {lv: [0, 0, 0, 0] for lv in accs}     # level -> [non-finite values, values, bad positions, positions]
    refused = False
    try:
        for parts in extractor.iter_vectors(lr):
            for lv, v in parts.items():
                c = counts.setdefault(lv, [0, 0, 0, 0])
                c[1] += v.numel()
                c[3] += v.shape[0]
                fin = torch.isfinite(v)
                if not bool(fin.all()):
                    c[0] += int((~fin).sum())
                    c[2] += int((~fin.all(1)).sum())
                    refused = True
                if refused:                         # from the first non-finite value on: only count
                    continue
                accs[lv].update(v)
                if lv == first:
                    n += v.shape[0]
    except BaseException:
        for lv, snap in saved.items():
            accs[lv].restore(snap)
        raise
    if refused:
        bad = {lv: c for lv, c in counts.items() if c[0]}
        for lv, snap in saved.items():
            accs[lv].restore(snap)
        raise NonFiniteStatisticsError(nonfinite_features_message(extractor.flow, bad, lr))
    return n


def nonfinite_features_message(flow, counts: Mapping[str, Sequence[int]], lr: Optional[torch.Tensor] = None) -> str:
    """The reason an image's conditioner features were refused: ``counts`` is ``{level: (non-finite values, values,
    positions with one, positions)}`` over the whole image; the likely cause comes from the flow's non-finite weights
    (``flow.info["nonfinite_keys"]``) or the input."""
    where = "; ".join(f"level {lv}: {c[0]} of {c[1]} feature values NaN/Inf ({c[2]} of {c[3]} positions)"
                      for lv, c in counts.items())
    if lr is not None and not bool(torch.isfinite(lr).all()):
        cause = "likely cause: the input image itself holds NaN/Inf values"
    else:
        cause = nonfinite_weights_cause(flow)
    return f"non-finite conditioner features, not used for the statistics: {where}; {cause}"


def nonfinite_weights_cause(flow) -> str:
    """``"likely cause: ..."`` for non-finite features or scores of a finite input: the checkpoint's NaN/Inf weight
    tensors when the loader found some (``flow.info["nonfinite_keys"]``), else the general causes."""
    keys = list(getattr(flow, "info", {}).get("nonfinite_keys") or []) if flow is not None else []
    if keys:
        return f"likely cause: {len(keys)} weight tensor(s) of the checkpoint hold NaN/Inf (e.g. {', '.join(keys[:3])})"
    return NONFINITE_CAUSE


def fit_flow(flow, images: Iterable[torch.Tensor], options: Optional[FeatureOptions] = None, *,
             shrinkage: str = "oas", ridge: float = 1e-3, max_condition: float = 1e10,
             meta: Optional[dict] = None) -> MahalanobisScorer:
    """Fits per-level Gaussians on the conditioner features of in-distribution LR images (streaming).

    Arguments:
        flow: the flow whose conditioner is scored.
        images: LR images, each ``[3, h, w]`` or ``[1, 3, h, w]`` in [0, 1] (any sizes; iterated once).
        options: levels, channels, tiling.
        shrinkage, ridge, max_condition: see :meth:`MahalanobisScorer.from_accumulators`.
        meta: provenance merged over the standard metadata of :func:`fit_statistics`.

    Returns:
        A :class:`MahalanobisScorer` with the metadata of :func:`fit_statistics` (``robustness-diag fit`` writes the
        same statistics and metadata keys for the same images).
    """
    import time
    started = time.time()
    ex = FeatureExtractor(flow, options)
    accs = make_accumulators(ex)
    n_images = 0
    for img in images:
        try:
            accumulate(ex, accs, img)
        except NonFiniteStatisticsError as e:
            raise NonFiniteStatisticsError(f"statistics refused: image {n_images}: {e}") from None
        n_images += 1
    return fit_statistics(ex, accs, n_images=n_images, shrinkage=shrinkage, ridge=ridge,
                          max_condition=max_condition, started=started, meta=meta)


def fit_statistics(extractor: FeatureExtractor, accs: Mapping[str, GaussianAccumulator], *, n_images: int,
                   shrinkage: str = "oas", ridge: float = 1e-3, max_condition: float = 1e10,
                   started: Optional[float] = None, meta: Optional[dict] = None) -> MahalanobisScorer:
    """The statistics of accumulators filled by :func:`accumulate`, with the standard fit metadata.

    The one fit step behind :func:`fit_flow` and ``robustness-diag fit``. Metadata (besides what
    :meth:`MahalanobisScorer.from_accumulators` records): ``checkpoint`` (the flow's file), ``checkpoint_digest``,
    ``flow_scale``/``flow_family``/``flow_coupling``, ``input`` (``"lr"``: the images were the LR inputs),
    ``n_images``, ``n_failed``/``failed`` (images that could not be used), ``images`` (the input paths, if known),
    ``features`` (:meth:`FeatureExtractor.describe`), ``device``, ``created`` (UTC, ISO 8601) and ``fit_seconds``
    (since ``started``, a ``time.time()`` value; 0.0 without it); ``meta`` overrides any of them.
    """
    import time
    from datetime import datetime, timezone

    from ..flows.digest import weights_digest
    flow = extractor.flow
    m = {"checkpoint": str(getattr(flow, "info", {}).get("path", "")), "checkpoint_digest": weights_digest(flow),
         "flow_scale": flow.scale, "flow_family": flow.family, "flow_coupling": flow.config.coupling,
         "input": "lr", "n_images": int(n_images), "n_failed": 0, "failed": [], "images": [],
         "features": extractor.describe(), "device": str(extractor.device),
         "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "fit_seconds": round(time.time() - started, 3) if started is not None else 0.0}
    m.update(meta or {})
    try:
        return MahalanobisScorer.from_accumulators(
            accs, shrinkage=shrinkage, ridge=ridge, max_condition=max_condition, channels=extractor.channels,
            n_channels_total={lv: extractor.n_channels for lv in extractor.levels}, meta=m)
    except NonFiniteStatisticsError as e:
        keys = list(getattr(flow, "info", {}).get("nonfinite_keys") or [])
        if not keys:
            raise
        raise NonFiniteStatisticsError(f"{e} (the checkpoint has {len(keys)} weight tensor(s) holding NaN/Inf, "
                                       f"e.g. {', '.join(keys[:3])})") from None


def extractor_for(flow, scorer: MahalanobisScorer, options: Optional[FeatureOptions] = None) -> FeatureExtractor:
    """A :class:`FeatureExtractor` matching the scorer's levels and channels (tiling from ``options``)."""
    opts = options or FeatureOptions()
    levels = list(opts.levels) if opts.levels else scorer.level_names
    ch = scorer.meta.get("channels")
    return FeatureExtractor(flow, FeatureOptions(levels=levels, channels=ch, tile=opts.tile, margin=opts.margin,
                                                 batch=opts.batch, pad_mode=opts.pad_mode))


def score_maps(flow, scorer: MahalanobisScorer, lr: torch.Tensor,
               options: Optional[FeatureOptions] = None) -> dict[str, torch.Tensor]:
    """Distance maps ``{level: [ceil(h*r), ceil(w*r)]}`` of one LR image ``[1, 3, h, w]`` (convenience wrapper of
    :meth:`FeatureExtractor.distance_maps`; build the extractor once with :func:`extractor_for` in loops)."""
    return extractor_for(flow, scorer, options).distance_maps(lr, scorer)


def upsample_map(score_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of a map ``[h, w]`` to ``size = (H, W)``, e.g. the HR image for
    overlays. Returns ``[H, W]`` float32."""
    m = score_map.float()[None, None]
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


AGGREGATES = ("mean", "p95", "p99", "max", "frac_above")


def nonfinite_score_reason(level: str, agg: Mapping[str, float], score_map, lr: Optional[torch.Tensor] = None,
                           flow=None) -> Optional[str]:
    """Why an image's scores at ``level`` are no result, or None when every aggregate of :func:`aggregate` is
    finite. A NaN/Inf aggregate (every position non-finite: from a finite image that means non-finite features or
    statistics) is a failure of that image with this reason, never an ok row; single non-finite positions among
    finite ones stay a result (counted, and above every threshold)."""
    bad = [k for k, v in agg.items() if not math.isfinite(float(v))]
    if not bad:
        return None
    m = score_map.detach() if isinstance(score_map, torch.Tensor) else torch.as_tensor(np.asarray(score_map))
    k = int((~torch.isfinite(m)).sum())
    if lr is not None and not bool(torch.isfinite(lr).all()):
        cause = "the input image holds NaN/Inf values"
    else:
        cause = f"from a finite input image; {nonfinite_weights_cause(flow)}"
    return (f"non-finite OOD score at level {level}: {', '.join(bad)} NaN/Inf ({k} of {m.numel()} positions "
            f"non-finite) {cause}")


def aggregate(score_map, threshold: float) -> dict[str, float]:
    """Image-level aggregates of a distance map (any shape): ``mean``, ``p95``, ``p99`` (linear-interpolated
    percentiles), ``max`` and ``frac_above`` (fraction of positions with distance > ``threshold``). NaN/Inf positions
    count as above the threshold and are ignored by the other statistics (all-NaN -> NaN)."""
    a = score_map.detach().cpu().double().numpy().ravel() if isinstance(score_map, torch.Tensor) \
        else np.asarray(score_map, dtype=np.float64).ravel()
    finite = np.isfinite(a)
    if a.size == 0:
        raise ValueError("empty score map")
    frac = float(np.mean(~finite | (a > threshold)))
    f = a[finite]
    if f.size == 0:
        return {"mean": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan"),
                "frac_above": frac}
    p95, p99 = np.percentile(f, [95, 99])
    return {"mean": float(f.mean()), "p95": float(p95), "p99": float(p99), "max": float(f.max()), "frac_above": frac}
