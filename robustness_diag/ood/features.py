r"""Conditioner features of a flow, tiled and padded, streamed into a fit or turned into distance maps.

Levels are the reference feature keys of :data:`robustness_diag.flows.rrdb.LEVEL_TO_NAME`: ``fea_up1`` is at LR
resolution for every scale (the default level), ``fea_up2``/``fea_up4``/... at 2x/4x/... LR, ``fea_up0`` at LR/2.
Each holds ``cond_channels`` channels (the level feature plus the stacked trunk blocks; 320 for SRFlow, 160 for the
bundled flows); a channel subset can be chosen.

Images of any size, exact by default: the LR image ``[1, 3, h, w]`` is padded (bottom/right, replicate) to the
multiple the flow needs and processed in one piece when its area is at most that of one tile window,
``(tile + 2 margin)^2`` LR pixels; larger images are cut into overlapping tiles (:mod:`robustness_diag.data.tiling`).
Outputs are cropped back to the ``h x w`` input (``ceil(h*r) x ceil(w*r)`` positions at a level of ratio ``r``).
The default margin is the flow's receptive field (:func:`receptive_field`, no cap: 62 LR px for the bundled flows,
347 for SRFlow's 23-block RRDB), so stitched features equal whole-image features up to floating-point summation
order. A smaller margin is the caller's choice for less memory and compute; it is not exact, and
:meth:`FeatureExtractor.stitching_error` measures the error of a stitched map against an exact computation
(``robustness-diag score`` does so for every tiled image and records it).

Memory (no gradients): about ``batch x (tile + 2 margin)^2`` LR pixels of conditioner activations at once, and never
more for an image processed whole. SRFlow's RRDB at ``fea_up1`` takes about 4.8 KB per LR pixel in float32
(measured on CPU), so its exact 950-px window of a 256-px tile is about 4.3 GB; every image up to 0.9 MPx LR (a 4K
frame's 960x540 LR included) runs whole. The default ``batch`` is 1 for that reason; ``tile`` trades memory
(window area) against the recomputed overlap (window area / core area: 13.8 at 256 px for SRFlow).
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
from .borders import DEFAULT_BORDER_MARGIN, interior_mask
from .errors import NonFiniteStatisticsError
from .gaussian import GaussianAccumulator
from .scorer import DEFAULT_THRESHOLD_QUANTILE, NONFINITE_CAUSE, MahalanobisScorer

DEFAULT_LEVEL = "fea_up1"
DEFAULT_TILE = 256
#: LR pixels on each side of the tile corner where :meth:`FeatureExtractor.stitching_error` compares (large images)
STITCH_CHECK_HALF = 16
#: Fraction of the in-distribution images held out of the Gaussian to calibrate the threshold (:func:`held_out`).
DEFAULT_CALIBRATION_FRACTION = 0.2
#: why a fit has no calibrated threshold (recorded in ``meta["threshold_calibration"]["reason"]``)
NO_HOLD_OUT = "calibration fraction 0: no image held out"
ALL_HELD_OUT = "too few images: every one would be held out, so all were fitted and none held out"


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
        tile: core tile size in LR pixels.
        margin: overlap in LR pixels on each side of a tile (None: the flow's receptive field, which makes tiling
            exact; smaller: less memory and compute, not exact, see :meth:`FeatureExtractor.stitching_error`).
        batch: tiles per forward pass (memory ~ batch x (tile + 2 margin)^2 LR pixels of activations).
        pad_mode: padding of odd sizes ("replicate", "reflect", "constant").
        whole_max_pixels: images of at most this many (padded) LR pixels are processed in one piece (None: the area
            of one tile window, ``(tile + 2 margin)^2``, so no image needs more memory than a window; 0: only images
            that fit in one tile).
    """

    levels: Optional[Sequence[str]] = None
    channels: object = None
    tile: int = DEFAULT_TILE
    margin: Optional[int] = None
    batch: int = 1
    pad_mode: str = "replicate"
    whole_max_pixels: Optional[int] = None


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
        a = self.align
        self.margin = -(-(int(opts.margin) if opts.margin is not None else self.rf) // a) * a   # as plan_tiles
        self.margin_source = "receptive field" if opts.margin is None else "given"
        self.tile = max(a, (int(opts.tile) // a) * a)
        self.whole_max_pixels = (int(opts.whole_max_pixels) if opts.whole_max_pixels is not None
                                 else (self.tile + 2 * self.margin) ** 2)
        self._ch_index = None

    @property
    def dim(self) -> int:
        return len(self.channels) if self.channels is not None else self.n_channels

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @property
    def exact(self) -> bool:
        """Whether tiled features equal whole-image ones (margin at least the receptive field)."""
        return self.margin >= self.rf

    def describe(self) -> dict:
        """JSON-ready settings (recorded in statistics files and run.json). ``stitch_exact``: the margin is at least
        the receptive field (tiling exact up to float summation order); otherwise scoring measures the error."""
        return {"levels": self.levels, "channels": self.channels, "n_channels_total": self.n_channels,
                "tile": self.tile, "margin": self.margin, "margin_source": self.margin_source,
                "batch": int(self.options.batch), "pad_mode": self.options.pad_mode, "alignment": self.align,
                "receptive_field": self.rf, "whole_max_pixels": self.whole_max_pixels, "stitch_exact": self.exact}

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
        return plan_tiles(hp, wp, self.tile, self.margin, self.align, self.whole_max_pixels)

    def n_tiles(self, h: int, w: int) -> int:
        """How many pieces an ``h x w`` LR image is processed in (1: whole, exact whatever the margin)."""
        a = self.align
        return len(self._tiles(-(-h // a) * a, -(-w // a) * a))

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
                        batch=self.options.batch, whole_max_pixels=self.whole_max_pixels)
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
                        batch=self.options.batch, whole_max_pixels=self.whole_max_pixels)
        return {k: crop_to(v, size, self.ratios[k])[0, 0] for k, v in out.items()}

    def stitch_check_box(self, h: int, w: int) -> Optional[tuple[int, int, int, int]]:
        """The LR-pixel box ``(y0, y1, x0, x1)`` where :meth:`stitching_error` compares for an ``h x w`` image, or
        None when the image is processed in one piece (exact).

        The exact reference needs the box grown by the receptive field, so the check costs at most one untiled
        window of ``(2 STITCH_CHECK_HALF + 2 receptive field)^2`` pixels (SRFlow: 726 px on a side). An image within
        that area is checked whole: the measured error is then the image's largest. A larger one is checked on a box
        of :data:`STITCH_CHECK_HALF` pixels (rounded up to the alignment) on each side of the first interior tile
        corner, where four tiles meet and the cores' context is cut on two sides (an image with one row (column) of
        tiles: its middle row (column) across the first seam); that is a spot check, a lower bound of the image's
        largest error (forced on whole LR photos of chelsea, china and grace_hopper with ``sr4x_affine``, tiles 32
        and 64, margins 4 and 8, it found 0.12 to 0.88 of the whole-image error)."""
        a = self.align
        hp, wp = -(-h // a) * a, -(-w // a) * a
        if len(self._tiles(hp, wp)) == 1:
            return None
        half = -(-STITCH_CHECK_HALF // a) * a
        if hp * wp <= (2 * half + 2 * (-(-self.rf // a) * a)) ** 2:
            return 0, hp, 0, wp
        cy = self.tile if hp > self.tile else (hp // 2 // a) * a
        cx = self.tile if wp > self.tile else (wp // 2 // a) * a
        return max(0, cy - half), min(hp, cy + half), max(0, cx - half), min(wp, cx + half)

    @torch.no_grad()
    def stitching_error(self, lr: torch.Tensor, scorer: MahalanobisScorer,
                        maps: Mapping[str, torch.Tensor]) -> Optional[dict]:
        """Measured error of stitched distance maps ``maps`` (from :meth:`distance_maps` of ``lr``) against an exact
        computation, or None when ``lr`` is processed in one piece.

        The exact reference is the distance map of one untiled window: the box of :meth:`stitch_check_box` (the
        whole image when it is small enough) grown by the receptive field on every side (clipped to the image, where
        the whole image ends too). Returns ``{"box": [y0, y1, x0, x1], "whole_image": bool, "window": [...],
        "levels": {level: {"max_abs", "max_rel", "positions"}}}`` (LR pixels; ``max_rel`` relative to the exact
        distance). With a margin of at least the receptive field it is float rounding (about 1e-5 in float32).
        """
        x, (h, w) = self._prepare(lr)
        box = self.stitch_check_box(h, w)
        if box is None:
            return None
        y0, y1, x0, x1 = box
        a = self.align
        m = -(-self.rf // a) * a
        hp, wp = x.shape[-2:]
        wy0, wy1, wx0, wx1 = max(0, y0 - m), min(hp, y1 + m), max(0, x0 - m), min(wp, x1 + m)
        feats = conditioner_features(self.flow, x[..., wy0:wy1, wx0:wx1], self.levels)
        out = {}
        for lv, f in feats.items():
            r = self.ratios[lv]
            ref = scorer.levels[lv].distance_map(f, scorer.compute_dtype)[0].float()
            vh, vw = math.ceil(h * r - 1e-9), math.ceil(w * r - 1e-9)
            py0, py1 = int(round(y0 * r)), min(int(round(y1 * r)), vh)
            px0, px1 = int(round(x0 * r)), min(int(round(x1 * r)), vw)
            oy, ox = int(round(wy0 * r)), int(round(wx0 * r))
            exact = ref[py0 - oy:py1 - oy, px0 - ox:px1 - ox]
            got = maps[lv][py0:py1, px0:px1].to(exact.device).float()
            diff = (got - exact).abs()
            diff = torch.where(torch.isnan(got) & torch.isnan(exact), torch.zeros_like(diff), diff)
            diff = torch.nan_to_num(diff, nan=math.inf)
            rel = diff / exact.abs().clamp_min(1e-12)
            out[lv] = {"max_abs": float(diff.max()) if diff.numel() else 0.0,
                       "max_rel": float(rel.max()) if rel.numel() else 0.0, "positions": int(diff.numel())}
        whole = (y0, y1, x0, x1) == (0, hp, 0, wp)
        return {"box": [y0, y1, x0, x1], "whole_image": whole, "window": [wy0, wy1, wx0, wx1], "levels": out}


def make_accumulators(extractor: FeatureExtractor) -> dict[str, GaussianAccumulator]:
    """One empty float64 accumulator per level of ``extractor``, on the flow's device."""
    return {lv: GaussianAccumulator(extractor.dim, device=extractor.device) for lv in extractor.levels}


def accumulate(extractor: FeatureExtractor, accs: Mapping[str, GaussianAccumulator], lr: torch.Tensor) -> int:
    """Streams the features of one LR image ``[1, 3, h, w]`` into ``accs`` (every position, the border included:
    the Gaussian models the conditioner's output as it is; only aggregates and the threshold calibration leave the
    border margin out); returns the number of positions added at the first level.

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


def held_out(index: int, fraction: float) -> bool:
    """Whether the image at ``index`` (0-based, in input order) is held out of the Gaussian to calibrate the
    threshold: deterministic, ``ceil(n * fraction)`` of the first ``n`` images, the first one always (with the
    default 0.2: images 0, 5, 10, ...).

    >>> [i for i in range(12) if held_out(i, 0.2)]
    [0, 5, 10]
    >>> any(held_out(i, 0.0) for i in range(12))
    False
    """
    from fractions import Fraction
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    fr = Fraction(float(fraction)).limit_denominator(10 ** 6)
    return math.ceil((index + 1) * fr) > math.ceil(index * fr)


class ThresholdCalibrator:
    """The empirical per-position threshold of fitted statistics, from in-distribution images held out of the fit.

    :meth:`add` scores one held-out LR image with the fitted ``scorer`` and keeps the distances of its interior
    positions (:func:`~.borders.interior_mask` with ``border_margin``, the margin image aggregates leave out) as
    float32; :meth:`apply` stores, per level, their ``quantile`` (numpy's linear interpolation) as the scorer's
    threshold with how it was obtained (``meta["threshold_calibration"]``). Memory: 4 bytes per kept position.
    Shared by :func:`fit_flow` and ``robustness-diag fit``.
    """

    def __init__(self, extractor: FeatureExtractor, scorer: MahalanobisScorer, *,
                 quantile: float = DEFAULT_THRESHOLD_QUANTILE, border_margin: int = DEFAULT_BORDER_MARGIN):
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"calibration quantile must be in (0, 1), got {quantile}")
        self.extractor, self.scorer = extractor, scorer
        self.quantile, self.border_margin = float(quantile), int(border_margin)
        self.values: dict[str, list[np.ndarray]] = {lv: [] for lv in extractor.levels}
        self.n_images = 0
        self.indices: list[int] = []

    @torch.no_grad()
    def add(self, lr: torch.Tensor, index: Optional[int] = None) -> int:
        """Scores one held-out image; returns the number of interior positions kept at the first level.

        Raises :class:`~.errors.NonFiniteStatisticsError` (and keeps nothing of the image) when a distance is
        NaN/Inf: such an image would have been refused by the fit too."""
        maps = self.extractor.distance_maps(lr, self.scorer)
        kept = {}
        for lv, m in maps.items():
            a = m.detach().cpu().float().numpy()
            a = a[interior_mask(a.shape[0], a.shape[1], self.border_margin)]
            if not np.isfinite(a).all():
                raise NonFiniteStatisticsError(
                    f"held-out image not used for the threshold: level {lv}: {int((~np.isfinite(a)).sum())} of "
                    f"{a.size} distances NaN/Inf; {nonfinite_weights_cause(self.extractor.flow)}")
            kept[lv] = a
        for lv, a in kept.items():
            self.values[lv].append(a)
        self.n_images += 1
        if index is not None:
            self.indices.append(int(index))
        return int(kept[self.extractor.levels[0]].size)

    def method(self) -> str:
        return (f"empirical {self.quantile} quantile (numpy linear interpolation) of the per-position distances of "
                f"{self.n_images} in-distribution image(s) held out of the Gaussian, positions at least "
                f"{self.border_margin} from the border")

    def apply(self, fraction: float) -> MahalanobisScorer:
        """Stores the calibrated thresholds in the scorer (returned); with no image added it stays on the chi
        quantile with the reason (:func:`mark_uncalibrated`)."""
        if not self.n_images:
            return mark_uncalibrated(self.scorer, "no held-out image could be scored", fraction=fraction,
                                     border_margin=self.border_margin, quantile=self.quantile)
        levels = {}
        for lv, parts in self.values.items():
            v = np.concatenate(parts).astype(np.float64)
            t = float(np.quantile(v, self.quantile))
            chi = chi_threshold(self.scorer, lv, self.quantile)
            levels[lv] = {"threshold": t, "quantile": self.quantile, "n_images": self.n_images,
                          "n_positions": int(v.size), "border_margin": self.border_margin, "method": self.method(),
                          "chi_quantile": chi, "frac_above_chi_quantile": float(np.mean(v > chi))}
        meta = self.scorer.meta
        meta["threshold_calibration"] = {
            "status": "calibrated", "reason": None, "fraction": float(fraction), "quantile": self.quantile,
            "border_margin": self.border_margin, "n_images": self.n_images, "held_out": list(self.indices),
            "method": self.method(), "levels": levels}
        meta["thresholds"] = {lv: c["threshold"] for lv, c in levels.items()}
        meta["threshold_source"] = f"calibrated: {self.method()}"
        return self.scorer


def chi_threshold(scorer: MahalanobisScorer, level: str, quantile: float = DEFAULT_THRESHOLD_QUANTILE) -> float:
    """The ``quantile`` of the chi distribution with the level's dimension as degrees of freedom."""
    from .scorer import chi_quantile
    return chi_quantile(quantile, scorer.levels[level].dim)


def mark_uncalibrated(scorer: MahalanobisScorer, reason: str, *, fraction: float,
                      border_margin: int = DEFAULT_BORDER_MARGIN,
                      quantile: float = DEFAULT_THRESHOLD_QUANTILE) -> MahalanobisScorer:
    """Records in the scorer's metadata that its thresholds are the chi quantiles, and why (returned)."""
    scorer.meta["threshold_calibration"] = {
        "status": "not calibrated", "reason": reason, "fraction": float(fraction), "quantile": float(quantile),
        "border_margin": int(border_margin), "n_images": 0, "held_out": [], "method": None, "levels": {}}
    return scorer


def fit_flow(flow, images: Iterable[torch.Tensor], options: Optional[FeatureOptions] = None, *,
             shrinkage: str = "oas", ridge: float = 1e-3, max_condition: float = 1e10,
             calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
             border_margin: int = DEFAULT_BORDER_MARGIN, meta: Optional[dict] = None) -> MahalanobisScorer:
    """Fits per-level Gaussians on the conditioner features of in-distribution LR images (streaming), and calibrates
    the per-position threshold on images held out of the fit.

    Arguments:
        flow: the flow whose conditioner is scored.
        images: LR images, each ``[3, h, w]`` or ``[1, 3, h, w]`` in [0, 1] (any sizes; iterated once).
        options: levels, channels, tiling.
        shrinkage, ridge, max_condition: see :meth:`MahalanobisScorer.from_accumulators`.
        calibration_fraction: share of the images held out of the Gaussian (:func:`held_out`: images 0, 5, 10, ...
            with the default 0.2); their interior per-position distances give the threshold
            (:class:`ThresholdCalibrator`). 0: no hold-out, the threshold is the chi quantile. With a single image
            nothing is held out (the threshold is then the chi quantile, said in the metadata). The held-out images
            are kept (referenced) until the fit is done.
        border_margin: positions that close to the border are left out of the calibration (as image aggregates
            leave them out, :func:`aggregate`).
        meta: provenance merged over the standard metadata of :func:`fit_statistics`.

    Returns:
        A :class:`MahalanobisScorer` with the metadata of :func:`fit_statistics` (``robustness-diag fit`` writes the
        same statistics and metadata keys for the same images).
    """
    import time
    started = time.time()
    held_out(0, calibration_fraction)                     # validates the fraction before any work
    ex = FeatureExtractor(flow, options)
    accs = make_accumulators(ex)
    n_images, kept = 0, []
    for i, img in enumerate(images):
        if held_out(i, calibration_fraction):
            kept.append((i, img))
            continue
        try:
            accumulate(ex, accs, img)
        except NonFiniteStatisticsError as e:
            raise NonFiniteStatisticsError(f"statistics refused: image {i}: {e}") from None
        n_images += 1
    reason = None if kept else NO_HOLD_OUT
    if kept and not n_images:                             # e.g. one image: nothing left for the Gaussian
        reason = ALL_HELD_OUT
        for i, img in kept:
            try:
                accumulate(ex, accs, img)
            except NonFiniteStatisticsError as e:
                raise NonFiniteStatisticsError(f"statistics refused: image {i}: {e}") from None
            n_images += 1
        kept = []
    scorer = fit_statistics(ex, accs, n_images=n_images, shrinkage=shrinkage, ridge=ridge,
                            max_condition=max_condition, started=started, meta=meta)
    if not kept:
        return mark_uncalibrated(scorer, reason, fraction=calibration_fraction, border_margin=border_margin)
    cal = ThresholdCalibrator(ex, scorer, border_margin=border_margin)
    for i, img in kept:
        try:
            cal.add(img, i)
        except NonFiniteStatisticsError as e:
            raise NonFiniteStatisticsError(f"statistics refused: image {i}: {e}") from None
    return cal.apply(calibration_fraction)


def fit_statistics(extractor: FeatureExtractor, accs: Mapping[str, GaussianAccumulator], *, n_images: int,
                   shrinkage: str = "oas", ridge: float = 1e-3, max_condition: float = 1e10,
                   started: Optional[float] = None, meta: Optional[dict] = None) -> MahalanobisScorer:
    """The statistics of accumulators filled by :func:`accumulate`, with the standard fit metadata.

    The one fit step behind :func:`fit_flow` and ``robustness-diag fit`` (both then calibrate the threshold with
    :class:`ThresholdCalibrator`). Metadata (besides what :meth:`MahalanobisScorer.from_accumulators` records):
    ``checkpoint`` (the flow's file), ``checkpoint_digest``, ``flow_scale``/``flow_family``/``flow_coupling``,
    ``input`` (``"lr"``: the images were the LR inputs), ``n_images`` (images in the Gaussian), ``n_failed``/``failed``
    (images that could not be used), ``images`` (the input paths, if known), ``features``
    (:meth:`FeatureExtractor.describe`), ``device``, ``created`` (UTC, ISO 8601) and ``fit_seconds`` (since
    ``started``, a ``time.time()`` value; 0.0 without it); ``meta`` overrides any of them.
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
                                                 batch=opts.batch, pad_mode=opts.pad_mode,
                                                 whole_max_pixels=opts.whole_max_pixels))


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


def aggregate(score_map, threshold: float, border_margin: int = DEFAULT_BORDER_MARGIN) -> dict[str, float]:
    """Image-level aggregates of a distance map ``[..., h, w]``: ``mean``, ``p95``, ``p99`` (linear-interpolated
    percentiles), ``max`` and ``frac_above`` (fraction of positions with distance > ``threshold``), over the positions
    at least ``border_margin`` positions from the map's edge (:func:`~.borders.interior_mask`; the conditioner's zero
    padding lifts the scores of border positions on clean images, see :mod:`.borders`). 0: every position (any
    shape); a map too small to keep anything is used whole. NaN/Inf positions count as above the threshold and are
    ignored by the other statistics (all-NaN -> NaN)."""
    a = score_map.detach().cpu().double().numpy() if isinstance(score_map, torch.Tensor) \
        else np.asarray(score_map, dtype=np.float64)
    if a.size == 0:
        raise ValueError("empty score map")
    if border_margin:
        if a.ndim < 2:
            raise ValueError(f"a border margin needs a map [..., h, w], got shape {a.shape}; pass border_margin=0")
        a = a[..., interior_mask(a.shape[-2], a.shape[-1], int(border_margin))]
    a = a.ravel()
    finite = np.isfinite(a)
    frac = float(np.mean(~finite | (a > threshold)))
    f = a[finite]
    if f.size == 0:
        return {"mean": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan"),
                "frac_above": frac}
    p95, p99 = np.percentile(f, [95, 99])
    return {"mean": float(f.mean()), "p95": float(p95), "p99": float(p99), "max": float(f.max()), "frac_above": frac}
