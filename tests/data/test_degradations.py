"""Condition labels of the documented degradations read as what they do."""
from __future__ import annotations

import pytest

from robustness_diag.data.degradations import BLUR_SIGMA, JPEG_QUALITY, NOISE_SIGMA, describe


@pytest.mark.parametrize("label, expect", [
    ("noise1", f"LR Gaussian noise, sigma {NOISE_SIGMA[1]:g}"),
    ("blur3", f"Gaussian sigma {BLUR_SIGMA[3]:g} px"),
    ("jpeg2", f"quality {JPEG_QUALITY[2]}"),
    ("exposure3", "contrast x3"),
    ("graphics", "checkerboard"),
])
def test_labels_are_described(label, expect):
    assert expect in describe(label)


def test_unknown_labels_pass_through():
    assert describe("adversarial") == "adversarial" and describe("noise9") == "noise9"
