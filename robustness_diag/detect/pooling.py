"""Artifact masks pooled onto a coarser grid: events per LR (or feature) cell, the unit the OOD score is read at."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def events_per_cell(mask: Tensor, grid: Sequence[int], n_images: int = 1) -> Tensor:
    """In how many samples each cell of ``grid`` had an artifact.

    Arguments:
        mask: bool artifact masks ``[S * n_images, H, W]``, sample-major (row ``s * n_images + b``).
        grid: ``(h, w)`` cells; a cell is an event in a sample when any HR pixel of its block is an artifact
            (adaptive max pooling, so ``H, W`` need not be multiples of ``h, w``).
        n_images: images per sample block.

    Returns:
        float32 counts ``[n_images, h, w]`` in ``0..S``.
    """
    m = mask.float()[:, None]
    pooled = m[:, 0] if tuple(m.shape[-2:]) == tuple(grid) else F.adaptive_max_pool2d(m, tuple(grid))[:, 0]
    return pooled.view(-1, n_images, *grid).sum(0)


def max_per_cell(values: Tensor, grid: Sequence[int]) -> Tensor:
    """The largest value over samples and over each cell's HR block: ``[S, H, W]`` -> ``[h, w]`` (dtype kept)."""
    t = values.amax(0)[None, None]
    return t[0, 0] if tuple(t.shape[-2:]) == tuple(grid) else F.adaptive_max_pool2d(t, tuple(grid))[0, 0]


__all__ = ["events_per_cell", "max_per_cell"]
