"""Documented degradations that turn in-distribution LR inputs into out-of-distribution conditions.

Each takes an LR batch ``[B, 3, h, w]`` in [0, 1] (and for some, the HR it came from) and a severity level 1..3;
all randomness goes through an explicit generator. The names are the condition labels used in reports.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .photos import downscale, load_photo

NOISE_SIGMA = {1: 0.05, 2: 0.1, 3: 0.2}          # additive Gaussian noise on the LR, std in [0, 1] units
BLUR_SIGMA = {1: 1.5, 2: 2.5, 3: 4.0}           # Gaussian blur of the HR (px) before downscaling: kernel mismatch
JPEG_QUALITY = {1: 30, 2: 15, 3: 5}              # OpenCV JPEG quality of the LR
EXPOSURE = {1: (0.5, 1.0), 2: (2.0, 1.0), 3: (1.0, 3.0)}   # (gain, contrast) around mid-grey, then clipped
GRAPHICS = ("text", "page", "checkerboard", "logo", "colorwheel")


def add_noise(lr, level: int, generator: torch.Generator):
    return (lr + NOISE_SIGMA[level] * torch.randn(lr.shape, generator=generator)).clamp(0, 1)


def blur_mismatch(hr, level: int, scale: int):
    s = BLUR_SIGMA[level]
    r = int(math.ceil(3 * s))
    x = torch.arange(-r, r + 1, dtype=hr.dtype)
    k = torch.exp(-x ** 2 / (2 * s * s))
    k = k / k.sum()
    c = hr.shape[1]
    pad = F.pad(hr, (r, r, r, r), mode="reflect")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return downscale(out, scale)


def jpeg(lr, level: int):
    import cv2
    import numpy as np
    out = []
    for img in lr:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[..., ::-1]
        ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY[level]])
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
        out.append(torch.from_numpy(dec).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def exposure(lr, level: int):
    gain, contrast = EXPOSURE[level]
    return ((lr * gain - 0.5) * contrast + 0.5).clamp(0, 1)


def graphics_lr(size: int, scale: int, n: int, generator: torch.Generator):
    """``n`` LR crops of synthetic/graphics images (text, page, checkerboard, logo, colour wheel)."""
    from .photos import random_crops
    imgs = [load_photo(name) for name in GRAPHICS]
    hr = random_crops(imgs, n, size * scale, generator, augment=False)
    return downscale(hr, scale)


def describe(condition: str) -> str:
    """Human-readable description of a condition label (``"noise1"`` -> ``"LR Gaussian noise, sigma 0.05"``);
    labels this module does not define are returned unchanged."""
    family, level = condition.rstrip("0123456789"), condition[len(condition.rstrip("0123456789")):]
    lv = int(level) if level else None
    if family == "noise" and lv in NOISE_SIGMA:
        return f"LR Gaussian noise, sigma {NOISE_SIGMA[lv]:g}"
    if family == "blur" and lv in BLUR_SIGMA:
        return f"HR blurred before downscaling (kernel mismatch), Gaussian sigma {BLUR_SIGMA[lv]:g} px"
    if family == "jpeg" and lv in JPEG_QUALITY:
        return f"LR JPEG, quality {JPEG_QUALITY[lv]}"
    if family == "exposure" and lv in EXPOSURE:
        gain, contrast = EXPOSURE[lv]
        return f"exposure gain x{gain:g}, contrast x{contrast:g}"
    if condition == "graphics":
        return "graphics images (" + ", ".join(GRAPHICS) + ")"
    if condition == "clean":
        return "held-out crops, undegraded"
    return condition
