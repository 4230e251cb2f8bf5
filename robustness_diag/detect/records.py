"""Result types of a traced sampling pass: :class:`StageRecord`, :class:`LayerRecord`, :class:`TraceResult`.

What the quantities mean (inverse log-slopes, activation growth, attribution, explosion and artifact maps) and what
a *trace level* is: :mod:`.trace`. Conventions of every tensor here:

* ``N = n_samples * B`` rows, sample-major (row ``s * B + b`` is sample ``s`` of LR image ``b``); ``H, W`` is the HR
  size; a map at trace level ``l`` is ``(N, H / 2**l, W / 2**l)``;
* slopes are natural logs of ``|dx/dy|`` (inverse direction, nats); growth factors are dimensionless; activations are
  in the flow's latent units;
* tensors stay on the sampling device until :meth:`TraceResult.cpu` / :meth:`TraceResult.rows`, which move them in
  one transfer per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor

_INF = float("inf")


def nanmax(x: Tensor, fill: float) -> Tensor:
    """Max over all non-batch dims of (N, ...) with NaN replaced by ``fill``: (N,)."""
    return torch.nan_to_num(x, nan=fill).flatten(1).amax(dim=1)


def move(value, device):
    """``value`` with every tensor in it (nested in dicts and tuples) moved to ``device``; other values as they are."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(move(v, device) for v in value)
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
        """A new record with every tensor moved to ``device``."""
        return StageRecord(*(move(getattr(self, f.name), device) for f in fields(self)))


@dataclass
class LayerRecord:
    """What one layer did during sampling (a small, fixed-size record: maps at the layer's own resolution).

    Attributes:
        index: reference layer index in the flow's sampling plan (``flow.sampling_plan().layers[index]``).
        name: human-readable name (:func:`.trace.layer_names`).
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
        """A new record with every tensor moved to ``device``."""
        return LayerRecord(self.index, self.name, self.kind, self.level, self.act_max.to(device),
                           self.growth.to(device), move(self.act_max_map, device), move(self.growth_map, device),
                           {k: v.to(device) for k, v in self.stages.items()})


@dataclass
class TraceResult:
    r"""Result of :func:`.trace.trace_sampling`; tensors stay on the sampling device until :meth:`cpu` / :meth:`rows`.

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
        return torch.where(torch.isnan(m).all(dim=1), torch.nan, nanmax(m, -_INF))

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
                v = move(v, device)
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


__all__ = ["StageRecord", "LayerRecord", "TraceResult", "nanmax", "move"]
