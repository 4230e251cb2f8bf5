r"""Distance of a score position to the image border, and the border margin left out of image aggregates.

The conditioner zero-pads its convolutions, so the features of positions near the border see the padding, and on
clean images they score higher than the same pixels do inside a larger image: every clean image's maximum sat at its
border. Image-level aggregates (:func:`robustness_diag.ood.aggregate`) and the threshold calibration therefore leave
out a margin of :data:`DEFAULT_BORDER_MARGIN` positions (of the scored feature grid) on every side unless told
otherwise; maps stay whole.

How the default was chosen (issue 13; measured on ``bundled:sr4x_affine`` and ``bundled:sr4x_rqspline`` at
``fea_up1``, statistics fitted with :func:`robustness_diag.ood.fit_flow` on 64 crops of 64 LR px of
:data:`robustness_diag.data.photos.TRAIN_PHOTOS`, seed 0). The border effect alone: 32 random crops of 24 and of
48 LR px of the held-out photo ``chelsea`` (LR 75x112), each scored on its own, minus the score of the same pixel in
the whole LR image (pixels at least 8 from the whole image's edge), by the pixel's distance ``d`` to the crop's
border (affine / rqspline; 48-px crops; the 24-px crops give the same mean shifts within 0.06 from ``d = 1`` on, and
+5.1 / +5.2 at ``d = 0``):

====  ==============  ==============  ===============
 d    mean shift      p99 of |shift|  max of |shift|
====  ==============  ==============  ===============
 0    +4.92 / +4.92   16.6 / 16.0     24.9 / 23.5
 1    +2.36 / +2.41   5.27 / 5.38     8.00 / 7.80
 2    +0.59 / +0.53   2.04 / 1.62     3.64 / 2.90
 3    +0.07 / +0.15   0.85 / 0.78     1.71 / 1.47
 4    +0.01 / +0.04   0.45 / 0.42     1.43 / 0.98
 6    -0.00 / +0.01   0.13 / 0.10     0.28 / 0.22
====  ==============  ==============  ===============

The interior score averages 9.71 / 9.13 on that image, so from ``d = 3`` on the systematic shift is below 2% of it
(0.07 / 0.15) and 99% of the shifts are below 9%, while ``d = 2`` is still shifted by +0.5 to +0.6 and ``d = 0`` by
half the interior score. On whole crops, the maximum sat at ``d = 0`` in all 32 crops of either size for both
flows. Hence a default margin of 3: aggregates use the positions with ``d >= 3`` (a 24-px map keeps 18 x 18 of its
positions, a 256-px one 95%). The reach of the effect grows with the conditioner's depth and was measured on the
bundled flows only; for another checkpoint, measure it the same way or pass another margin (``score
--border-margin``).
"""
from __future__ import annotations

import numpy as np

#: Positions (of the scored grid) left out on every side of an image by default (measured, see the module docstring).
DEFAULT_BORDER_MARGIN = 3


def border_distance(h: int, w: int) -> np.ndarray:
    """``[h, w]`` int64: for each position, how many positions separate it from the nearest edge (0 on the edge).

    >>> border_distance(3, 4).tolist()
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    if h < 1 or w < 1:
        raise ValueError(f"need a non-empty grid, got {h}x{w}")
    rows = np.minimum(np.arange(h), np.arange(h)[::-1])
    cols = np.minimum(np.arange(w), np.arange(w)[::-1])
    return np.minimum(rows[:, None], cols[None, :]).astype(np.int64)


def interior_mask(h: int, w: int, margin: int) -> np.ndarray:
    """``[h, w]`` bool: positions at least ``margin`` positions away from every edge. When the margin would leave
    nothing (a grid smaller than ``2 * margin + 1`` on a side), every position is kept.

    >>> int(interior_mask(5, 6, 2).sum()), int(interior_mask(3, 3, 2).sum())
    (2, 9)
    """
    if margin < 0:
        raise ValueError(f"border margin must be >= 0, got {margin}")
    m = border_distance(h, w) >= margin
    return m if m.any() else np.ones((h, w), dtype=bool)
