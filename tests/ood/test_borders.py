"""Border distance, the interior mask, and image aggregates that leave the border margin out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustness_diag.ood import DEFAULT_BORDER_MARGIN, aggregate, border_distance, interior_mask


def test_border_distance_and_interior_mask():
    d = border_distance(6, 9)
    assert d.shape == (6, 9) and d.max() == 2 and d[0].tolist() == [0] * 9 and d[2, 2:7].tolist() == [2] * 5
    assert interior_mask(6, 9, 0).all() and interior_mask(6, 9, 1).sum() == 4 * 7
    assert interior_mask(6, 9, 2).sum() == 2 * 5
    assert interior_mask(6, 9, 3).all()                      # nothing would be left: every position is kept
    with pytest.raises(ValueError, match=">= 0"):
        interior_mask(4, 4, -1)
    with pytest.raises(ValueError, match="non-empty"):
        border_distance(0, 3)


def test_aggregate_leaves_out_the_border_margin_by_default():
    m = torch.ones(12, 14)
    b = border_distance(12, 14)
    m[torch.from_numpy(b < DEFAULT_BORDER_MARGIN)] = 100.0     # a frame of high border scores
    m[5, 6] = 2.0
    a = aggregate(m, threshold=1.5)
    inner = (12 - 2 * DEFAULT_BORDER_MARGIN) * (14 - 2 * DEFAULT_BORDER_MARGIN)
    assert a["max"] == 2.0 and a["frac_above"] == pytest.approx(1 / inner)
    assert a["mean"] == pytest.approx((inner - 1 + 2.0) / inner)
    whole = aggregate(m, threshold=1.5, border_margin=0)
    assert whole["max"] == 100.0 and whole["frac_above"] == pytest.approx(float((m > 1.5).float().mean()))
    one = aggregate(m.numpy(), threshold=1.5, border_margin=1)    # numpy maps too
    assert one["max"] == 100.0 and one["frac_above"] == pytest.approx(
        float((m[1:-1, 1:-1] > 1.5).float().mean()))
    batch = aggregate(torch.stack([m, m]), threshold=1.5)        # [..., h, w]: the margin of the last two dims
    assert batch["frac_above"] == pytest.approx(a["frac_above"])


def test_aggregate_of_a_small_map_uses_every_position_and_flat_arrays_need_margin_0():
    m = np.arange(16, dtype=float).reshape(4, 4)
    assert aggregate(m, 100.0)["mean"] == pytest.approx(7.5)      # 4x4 < 2 * 3 + 1: all positions
    with pytest.raises(ValueError, match="border_margin=0"):
        aggregate(np.arange(5.0), 1.0)
    assert aggregate(np.arange(5.0), 1.0, border_margin=0)["max"] == 4.0
