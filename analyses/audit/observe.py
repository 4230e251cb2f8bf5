"""What the audit reads off one traced batch: score maps, per-layer slope maxima, per-image flags and examples.

Shared by the stress conditions (:mod:`.measure`) and the adversarial search (:mod:`.attack`). ``tr`` is a
:class:`robustness_diag.detect.TraceResult` moved to the CPU; rows are ``(image, sample)`` pairs with
``tr.image_index`` naming the image of each row.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor


def layer_maxima(tr) -> list:
    """``[{"layer", "max_log_slope"}]`` of every traced layer with coupling stages."""
    return [{"layer": r.name, "max_log_slope": max(float(s.log_slope_max.max()) for s in r.stages.values())}
            for r in tr.layers if r.stages]


def max_finite(t: Tensor) -> Optional[float]:
    """The largest finite entry of ``t`` (None when there is none)."""
    finite = torch.isfinite(t)
    return float(t[finite].max()) if finite.any() else None


def score_map(flow, scorer, lr: Tensor) -> Tensor:
    """OOD score map at the scorer's primary level, float64 on the CPU, ``[B, h, w]``."""
    level = scorer.primary_level
    with torch.no_grad():
        return scorer({level: flow.features(lr)[level]})[level].double().cpu()


def example_arrays(tr, lr: Tensor) -> tuple[int, int, dict]:
    """``(sample row, image index, arrays)`` of the sample with the most artifact pixels."""
    n = int(tr.artifact_pixels.argmax())
    b = int(tr.image_index[n])
    return n, b, {"lr": lr[b].permute(1, 2, 0).cpu().numpy(), "sample": tr.image[n].permute(1, 2, 0).numpy(),
                  "mask": tr.artifact_mask[n].numpy(), "explosion": tr.explosion_map[n].numpy(),
                  "attribution": tr.attribution[n].numpy()}



def per_image_flags(tr, n_images: int) -> dict:
    """Per image ``[n_images]``: ``flagged`` (samples flagged by the paper's per-image criterion: any pixel > 1.5,
    < -0.5 or non-finite), ``samples`` (samples drawn) and ``artifact_fraction`` (artifact pixels / pixels over its
    samples, in [0, 1])."""
    idx = tr.image_index.long()
    flagged = torch.zeros(n_images).index_add_(0, idx, (tr.artifact_pixels > 0).double().float())
    samples = torch.zeros(n_images).index_add_(0, idx, torch.ones(idx.numel()))
    pixels = tr.artifact_mask[0].numel()
    art = torch.zeros(n_images, dtype=torch.float64).index_add_(0, idx, tr.artifact_pixels.double())
    return {"flagged": flagged.numpy().astype(np.int64), "samples": samples.numpy().astype(np.int64),
            "artifact_fraction": (art / (samples.double() * pixels).clamp_min(1)).numpy()}
