r"""Colour-mapped overlays of a per-pixel map (OOD distance, artifact probability, ...) on an image, as PNG.

A map is colour-mapped on a *fixed* scale ``[vmin, vmax]`` (pass the same scale for every image of a run, so that
colours compare across images: per-image normalisation makes in-distribution images look anomalous), blended over
the image, and a colour bar strip is added at the bottom (``colorbar=True``). matplotlib is imported lazily (only its
colormap registry, no pyplot); PNG writing uses Pillow, atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from robustness_diag.io import atomic_write


def _as_hwc(image) -> np.ndarray:
    """``[3, H, W]`` tensor/array or ``[H, W, 3]`` / ``[H, W]`` array in [0, 1] -> ``[H, W, 3]`` float32."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def colorize(score_map, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """``[H, W]`` map -> ``[H, W, 3]`` float32 RGB in [0, 1] on the scale ``[vmin, vmax]`` (clipped); NaN/Inf
    positions are drawn at the top of the scale."""
    from matplotlib import colormaps
    if hasattr(score_map, "detach"):
        score_map = score_map.detach().cpu().float().numpy()
    m = np.asarray(score_map, dtype=np.float64)
    m = np.where(np.isfinite(m), m, vmax)
    span = max(float(vmax) - float(vmin), 1e-12)
    t = np.clip((m - float(vmin)) / span, 0.0, 1.0)
    return colormaps[cmap](t)[..., :3].astype(np.float32)


def overlay(image, score_map, *, vmin: float, vmax: float, alpha: float = 0.55, cmap: str = "inferno",
            colorbar: bool = True) -> np.ndarray:
    """Blends the colour-mapped ``score_map`` ``[H, W]`` over ``image`` (same ``H x W``, see :func:`_as_hwc`).

    Returns ``[H(+bar), W, 3]`` uint8; with ``colorbar`` a strip of ``max(6, H // 24)`` rows showing the scale from
    ``vmin`` (left) to ``vmax`` (right) is appended below.
    """
    img = _as_hwc(image)
    col = colorize(score_map, vmin, vmax, cmap)
    if col.shape[:2] != img.shape[:2]:
        raise ValueError(f"map {col.shape[:2]} and image {img.shape[:2]} sizes differ; upsample the map first")
    out = (1.0 - alpha) * img + alpha * col
    if colorbar:
        h, w = out.shape[:2]
        bar_h = max(6, h // 24)
        ramp = np.linspace(vmin, vmax, max(w, 2))[None, :w].repeat(bar_h, 0)
        out = np.concatenate([out, colorize(ramp, vmin, vmax, cmap)], axis=0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_overlay(path, image, score_map, *, vmin: float, vmax: float, alpha: float = 0.55, cmap: str = "inferno",
                 colorbar: bool = True, max_side: Optional[int] = None) -> Path:
    """Writes :func:`overlay` as a PNG atomically; ``max_side`` downsizes (area filter) larger results."""
    from PIL import Image
    arr = overlay(image, score_map, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap, colorbar=colorbar)
    im = Image.fromarray(arr)
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.BOX)
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))
