r"""Overlapping tiles for images larger than a tile, stitched exactly; padding of odd sizes and cropping back.

A tile has a *core* (the pixels it is responsible for) and an *extended* window (core plus ``margin`` pixels on every
side, clipped to the image). A function ``fn`` runs on extended windows; its outputs are cropped to the cores and
written into place. Where the image ends, the window ends too, so the network sees the same zero padding as on the
whole image. Consequence: if every output position depends only on inputs within ``margin`` pixels (the receptive
field), the stitched result equals the whole-image result up to floating-point summation order; with a smaller
margin it does not, and nothing here can tell by how much (the OOD scorer measures it:
:meth:`robustness_diag.ood.FeatureExtractor.stitching_error`).

Outputs may live on a grid at another resolution: ``ratios[key] = r`` means output ``key`` of an input window of
``h x w`` pixels has ``h*r x w*r`` positions (``r`` = 2 for a feature at twice the input size, 0.5 at half).
Tile corners and margins are multiples of ``align`` so that ``y*r`` is an integer for every ratio in use.

Memory: one call of ``fn`` sees at most ``batch`` windows of at most ``(tile + 2 margin)^2`` pixels. An image that
fits in one tile, or (``whole_max_pixels``) whose area is at most that of one full window, is one piece: it needs
no more memory than a single window and less compute than its overlapping tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Tile:
    """Core ``[y0, y1) x [x0, x1)`` and extended window ``[ey0, ey1) x [ex0, ex1)``, in input pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    ey0: int
    ey1: int
    ex0: int
    ex1: int

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.ey1 - self.ey0, self.ex1 - self.ex0


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def plan_tiles(height: int, width: int, tile: int, margin: int, align: int = 1,
               whole_max_pixels: int = 0) -> list[Tile]:
    """Splits an ``height x width`` image into cores of ``tile x tile`` (the last row/column may be smaller).

    ``tile`` is rounded down and ``margin`` up to multiples of ``align``; ``height`` and ``width`` must already be
    multiples of ``align`` (pad first, :func:`pad_to_multiple`). An image that fits in one tile, or whose area
    ``height * width`` is at most ``whole_max_pixels``, is one tile with no margin (the whole image).

    >>> [(t.y0, t.y1, t.ey0, t.ey1) for t in plan_tiles(12, 4, 4, 2)]
    [(0, 4, 0, 6), (4, 8, 2, 10), (8, 12, 6, 12)]
    >>> len(plan_tiles(12, 4, 4, 2, whole_max_pixels=(4 + 2 * 2) ** 2))
    1
    """
    if height % align or width % align:
        raise ValueError(f"image {height}x{width} is not a multiple of the alignment {align}; pad it first")
    tile = max(align, (int(tile) // align) * align)
    margin = _round_up(max(0, int(margin)), align)
    if (height <= tile and width <= tile) or height * width <= int(whole_max_pixels or 0):
        return [Tile(0, height, 0, width, 0, height, 0, width)]
    tiles = []
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            tiles.append(Tile(y0, y1, x0, x1, max(0, y0 - margin), min(height, y1 + margin),
                              max(0, x0 - margin), min(width, x1 + margin)))
    return tiles


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pads ``x`` ``[B, C, H, W]`` at the bottom and right to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)``, to crop outputs back with :func:`crop_to`.
    ``mode``: ``"replicate"`` (default), ``"reflect"`` (falls back to replicate when the image is too small to
    reflect) or ``"constant"`` (zeros).
    """
    h, w = x.shape[-2:]
    ph, pw = _round_up(h, multiple) - h, _round_up(w, multiple) - w
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to(y: torch.Tensor, size: tuple[int, int], ratio: float = 1.0) -> torch.Tensor:
    """Crops an output grid ``[..., H', W']`` back to an input of ``size = (H, W)``:
    ``ceil(H*ratio) x ceil(W*ratio)``."""
    h, w = math.ceil(size[0] * ratio - 1e-9), math.ceil(size[1] * ratio - 1e-9)
    return y[..., :h, :w]


def _scaled(v: int, r: float) -> int:
    s = v * r
    if abs(s - round(s)) > 1e-9:
        raise ValueError(f"tile boundary {v} is not aligned for an output at ratio {r}; increase the alignment")
    return int(round(s))


def iter_tiled(x: torch.Tensor, fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], tiles: list[Tile],
               ratios: Mapping[str, float], batch: int = 1) -> Iterator[tuple[Tile, dict[str, torch.Tensor]]]:
    """Runs ``fn`` on the extended windows of ``tiles`` and yields each tile with its outputs cropped to its core.

    Arguments:
        x: ``[1, C, H, W]`` input (one image).
        fn: ``[n, C, h, w] -> {key: [n, K, h*r_key, w*r_key]}`` for a batch of ``n`` windows of equal size.
        tiles: from :func:`plan_tiles`.
        ratios: output-grid resolution per key, relative to the input.
        batch: at most this many windows per call (windows of equal shape are batched together, in tile order).

    Yields:
        ``(tile, {key: [1, K, (y1-y0)*r, (x1-x0)*r]})`` for every tile.
    """
    if x.shape[0] != 1:
        raise ValueError(f"iter_tiled takes one image [1, C, H, W], got {tuple(x.shape)}")
    pending: dict[tuple[int, int], list[Tile]] = {}
    order = []
    for t in tiles:
        if t.window_shape not in pending:
            pending[t.window_shape] = []
            order.append(t.window_shape)
        pending[t.window_shape].append(t)
    for shape in order:
        group = pending[shape]
        for i in range(0, len(group), max(1, int(batch))):
            chunk = group[i:i + max(1, int(batch))]
            windows = torch.cat([x[:, :, t.ey0:t.ey1, t.ex0:t.ex1] for t in chunk], dim=0)
            out = fn(windows)
            for j, t in enumerate(chunk):
                cropped = {}
                for key, val in out.items():
                    r = ratios[key]
                    cy0, cy1 = _scaled(t.y0 - t.ey0, r), _scaled(t.y1 - t.ey0, r)
                    cx0, cx1 = _scaled(t.x0 - t.ex0, r), _scaled(t.x1 - t.ex0, r)
                    cropped[key] = val[j:j + 1, ..., cy0:cy1, cx0:cx1]
                yield t, cropped


def tiled_map(x: torch.Tensor, fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], *, tile: int, margin: int,
              ratios: Mapping[str, float], align: int = 1, batch: int = 1,
              whole_max_pixels: int = 0) -> dict[str, torch.Tensor]:
    """Whole-image outputs of ``fn`` computed tile by tile and stitched: ``{key: [1, K, H*r, W*r]}``.

    ``x`` is ``[1, C, H, W]`` with ``H``, ``W`` multiples of ``align``; tiles as :func:`plan_tiles`. Keep the
    per-window outputs small (e.g. a score map, ``K = 1``): the stitched outputs are whole-image sized, the features
    inside ``fn`` are not.
    """
    h, w = x.shape[-2:]
    tiles = plan_tiles(h, w, tile, margin, align, whole_max_pixels)
    out: dict[str, torch.Tensor] = {}
    for t, parts in iter_tiled(x, fn, tiles, ratios, batch):
        for key, val in parts.items():
            r = ratios[key]
            if key not in out:
                out[key] = val.new_empty(val.shape[:-2] + (_scaled(h, r), _scaled(w, r)))
            out[key][..., _scaled(t.y0, r):_scaled(t.y1, r), _scaled(t.x0, r):_scaled(t.x1, r)] = val
    return out
