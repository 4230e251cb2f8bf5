r"""LLFlow's input preprocessing for low-light images (wyf0912/LLFlow ``test_unpaired.py`` / ``LoL_dataset.py``).

LLFlow does not condition on the dark RGB image itself but on a 6-channel tensor (the shipped configs set
``log_low: true`` and ``concat_histeq: true``)::

    cond = cat([ log(clamp(x + 1e-3, min=1e-3)),      # channels 0-2: log of the dark image
                 equalize_hist(x) ], dim=1)             # channels 3-5: per-channel histogram equalisation

where ``x`` is the dark RGB image in [0, 1] (the reference reads 8-bit files and divides by 255). The histogram
equalisation is OpenCV's ``cv2.equalizeHist`` applied to each 8-bit channel separately, exactly as the reference does;
a float image is first quantised to 8 bits with ``round(255 x)`` (an 8-bit decoded image is unchanged by this).
The conditioner itself then appends the colour map and the noise map (6 more channels, 12 in total).

Image sizes must be multiples of 8 (the flow squeezes three times); pad before calling (the reference pads with
``reflect`` to a multiple of 2 or 16 in its test scripts).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Offset and floor of the reference's log input: ``log(clamp(x + LOG_OFFSET, min=LOG_OFFSET))``.
LOG_OFFSET = 1e-3


def quantize8(x: Tensor) -> np.ndarray:
    """``[B, C, H, W]`` float in [0, 1] -> uint8 numpy array of the same shape (``round(255 x)``, clipped)."""
    return np.clip(np.rint(x.detach().to("cpu", torch.float64).numpy() * 255.0), 0, 255).astype(np.uint8)


def equalize_hist(x: Tensor) -> Tensor:
    """Per-channel 8-bit histogram equalisation (``cv2.equalizeHist``) of ``x`` ``[B, C, H, W]`` in [0, 1].

    Returns a tensor of ``x``'s shape, dtype and device with values in ``{0, 1/255, ..., 1}``. Computed on the CPU.
    """
    import cv2  # local: only this helper needs OpenCV

    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    q = quantize8(x)
    out = np.empty_like(q)
    for b in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[b, c] = cv2.equalizeHist(np.ascontiguousarray(q[b, c]))
    return torch.from_numpy(out.astype(np.float32) / 255.0).to(device=x.device, dtype=x.dtype)


def log_input(x: Tensor) -> Tensor:
    """The reference's log input ``log(clamp(x + 1e-3, min=1e-3))`` (same shape as ``x``)."""
    return torch.log(torch.clamp(x + LOG_OFFSET, min=LOG_OFFSET))


def lowlight_condition(x: Tensor) -> Tensor:
    """LLFlow conditioning input from dark RGB images.

    Arguments:
        x: ``[B, 3, H, W]`` dark images in [0, 1] (H, W multiples of 8 for LLFlow).

    Returns:
        ``[B, 6, H, W]``: channels 0-2 ``log(clamp(x + 1e-3, min=1e-3))`` (natural log, in [-6.91, 0.001]),
        channels 3-5 the per-channel histogram-equalised image in [0, 1].
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"low-light input must be RGB [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
    return torch.cat([log_input(x), equalize_hist(x)], dim=1)


#: Defaults of :func:`darken`: a linear gain after a gamma curve (mean brightness of the photos drops ~10x).
DARKEN_GAIN = 0.3
DARKEN_GAMMA = 2.0


def darken(x: Tensor, gain: float = DARKEN_GAIN, gamma: float = DARKEN_GAMMA) -> Tensor:
    """Synthetic low-light image from a normal-light one: ``round(255 * gain * x**gamma) / 255``.

    The gamma curve crushes shadows more than highlights and the gain lowers the exposure, the usual recipe for
    synthetic low-light pairs (the LOL data are real captures; this stands in for them where no dark photos exist).
    Quantised to 8 bits like a saved file.

    Arguments:
        x: ``[..., 3, H, W]`` in [0, 1].
        gain: exposure gain in (0, 1]; gamma: exponent >= 1.

    Returns:
        A tensor of ``x``'s shape, dtype and device in ``[0, gain]``.
    """
    if not 0 < gain <= 1 or gamma < 1:
        raise ValueError(f"darken needs 0 < gain <= 1 and gamma >= 1, got gain={gain}, gamma={gamma}")
    return torch.round(gain * x.clamp(0, 1) ** gamma * 255.0) / 255.0
