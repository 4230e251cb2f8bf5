"""Shared helpers of the OOD tests: a tiny seeded flow, image writers, and a single-thread fixture.

The machines these tests run on are shared; with several OpenMP threads competing, each of the tiny networks' many
small convolutions pays a scheduling penalty, so the tests pin torch to one thread (restored afterwards).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import robustness_diag as rd
from robustness_diag.flows.config import FlowConfig
from robustness_diag.flows.synthetic import randomize_flow

TINY = dict(nf=4, nb=2, gc=4, blocks=[0, 1], cond_channels=12, hidden=6, K=1, n_additional=1, f_in=192, f_out=96)


def tiny_flow(seed: int = 0, **over) -> rd.SRFlowFamily:
    """A seeded 4X SRFlow-layout flow with a 2-block RRDB (12 conditioner channels, receptive field 32 LR px)."""
    cfg = dict(TINY)
    cfg.update(over)
    return randomize_flow(rd.build_flow(FlowConfig(**cfg)), seed=seed, lr_size=4, batch=8)


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """``[h, w, 3]`` float in [0, 1]: low-frequency random image (photo-like)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((h, w, 3))
    for _ in range(4):
        f = rng.random((3, 2)) * 3
        ph = rng.random(3) * 6.28
        out += np.sin(6.28 * (f[:, 0] * xx[..., None] + f[:, 1] * yy[..., None]) + ph)
    return np.clip(0.5 + 0.12 * out, 0, 1)


def write_png(path, arr01: np.ndarray, bits: int = 8) -> None:
    from PIL import Image
    if bits == 8:
        Image.fromarray((arr01 * 255 + 0.5).astype(np.uint8)).save(path)
    else:
        import cv2
        a = (arr01 * 65535 + 0.5).astype(np.uint16)
        cv2.imwrite(str(path), a[..., ::-1] if a.ndim == 3 else a)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
