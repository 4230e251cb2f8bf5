r"""Safe sampling: sample, detect artifact pixels by the reference criterion, repair only those pixels.

Repair (beyond the paper): for each sample that has artifact pixels, the latents around the still-bad pixels are
cooled to a lower heat (the *same* noise scaled by ``h / heat``, so no new randomness is needed and the repair is
deterministic), the affected samples alone are decoded again, and every bad pixel that the cooler sample renders
valid is taken from it. Heats are tried in order (default ``heat/2, heat/4, 0``); pixels still bad after the last
one fall back to the bicubic upsampling of the LR (``fallback="bicubic"``) or stay as they are (``"none"``).
Pixels without artifacts are never changed: they are bitwise those of ``flow.sample`` with the same latents.

Cost when nothing is wrong: one plain sampling pass, one element-wise mask and one device-to-host sync.

References:
    Hong, Park & Chun, "On the Robustness of Normalizing Flows for Inverse Problems in Imaging", ICCV 2023,
    https://arxiv.org/abs/2212.04319
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flows.base import Flow
from .trace import LOWER, UPPER, artifact_masks, replicate_inputs

#: ``source`` code of pixels kept from the original sample.
ORIGINAL = 0
#: ``source`` code of pixels still bad after every repair (only with ``fallback="none"``).
UNREPAIRED = -1


@dataclass
class SafeSampleResult:
    r"""Result of :func:`safe_sample`. ``N = n_samples * B`` rows, sample-major (``s * B + b``); HR size ``H, W``.

    Attributes:
        image: repaired final images (before clamping), (N, 3, H, W).
        artifact_mask: artifact pixels of the original sample, bool (N, H, W).
        source: where each pixel comes from, int8 (N, H, W): 0 original sample, ``k`` = 1..len(heats) the repair at
            ``heats[k-1]``, ``len(heats) + 1`` the bicubic fallback, -1 still bad (``fallback="none"``).
        remaining_mask: artifact pixels of the returned image, bool (N, H, W).
        heats: the repair heats tried, in order.
        heat: the sampling heat.
    """

    image: Tensor
    artifact_mask: Tensor
    source: Tensor
    remaining_mask: Tensor
    heats: tuple
    heat: float

    @property
    def artifact_fraction(self) -> Tensor:
        """Fraction of pixels that were artifacts in the original sample, (N,)."""
        return self.artifact_mask.flatten(1).float().mean(dim=1)

    @property
    def repaired_fraction(self) -> Tensor:
        """Fraction of pixels repaired by the flow at a lower heat (not the fallback), (N,)."""
        s = self.source.flatten(1)
        return ((s >= 1) & (s <= len(self.heats))).float().mean(dim=1)

    @property
    def fallback_fraction(self) -> Tensor:
        """Fraction of pixels taken from the bicubic fallback, (N,)."""
        return (self.source.flatten(1) == len(self.heats) + 1).float().mean(dim=1)

    @property
    def remaining_fraction(self) -> Tensor:
        """Fraction of artifact pixels left in the returned image, (N,)."""
        return self.remaining_mask.flatten(1).float().mean(dim=1)

    def summary(self) -> dict:
        """Whole-batch fractions as floats (one transfer): artifact, repaired, fallback, remaining pixels."""
        return {"artifact_fraction": float(self.artifact_fraction.mean()),
                "repaired_fraction": float(self.repaired_fraction.mean()),
                "fallback_fraction": float(self.fallback_fraction.mean()),
                "remaining_fraction": float(self.remaining_fraction.mean()),
                "heats": list(self.heats)}


def _region(mask: Tensor, size: tuple[int, int], margin: int) -> Tensor:
    """Latent positions covering any True pixel of ``mask`` (n, H, W), grown by ``margin``: bool (n, 1, h, w)."""
    m = mask[:, None].to(torch.float32)
    f = mask.shape[-1] // size[-1]
    if f > 1:
        m = F.max_pool2d(m, f, f)
    if margin > 0:
        m = F.max_pool2d(m, 2 * margin + 1, 1, margin)
    return m > 0


def guard(image: Tensor, upper: float = UPPER, lower: float = LOWER) -> tuple[Tensor, Tensor, bool]:
    """The check :func:`safe_sample` adds to a plain sampling pass: ``(bad, source, any_bad)`` for ``image``
    (N, 3, H, W): the artifact mask (N, H, W), an all-:data:`ORIGINAL` source map (int8, N x H x W) and whether any
    pixel is bad (the one host sync)."""
    bad = artifact_masks(image, upper, lower)[0]
    source = torch.zeros(bad.shape, dtype=torch.int8, device=bad.device)
    return bad, source, bool(bad.any())


@torch.no_grad()
def safe_sample(flow: Flow, lr: Tensor, heat: Optional[float] = None, n_samples: int = 1,
                generator: Optional[torch.Generator] = None, *, latents: Optional[list] = None,
                std: Optional[Tensor] = None, heats: Optional[Sequence[float]] = None, margin: int = 1,
                fallback: str = "bicubic", upper: float = UPPER, lower: float = LOWER) -> SafeSampleResult:
    r"""Creates samples whose artifact pixels are repaired by local cooling of the latents (see module docstring).

    Arguments:
        flow: an SRFlow-family flow on ``lr``'s device and dtype.
        lr: LR images y, (B, 3, h, w) in [0, 1].
        heat: sampling heat (default ``flow.default_heat``).
        n_samples: samples per LR image (rows sample-major, as :func:`~.trace.trace_sampling`).
        generator: the only source of randomness; the latents equal those of ``trace_sampling`` with the same
            arguments, so the unrepaired pixels match it bitwise.
        latents: explicit latents for all rows instead of drawing.
        std: NCSR std map or None.
        heats: repair heats tried in order (default ``(heat / 2, heat / 4, 0.0)``).
        margin: latent positions around a bad pixel's own that are cooled too, at every latent resolution.
        fallback: "bicubic" (pixels still bad take ``flow.upsample(lr)``) or "none".
        upper, lower: artifact thresholds of the reference criterion.

    Returns:
        A :class:`SafeSampleResult` on ``lr``'s device.
    """
    if fallback not in ("bicubic", "none"):
        raise ValueError(f"fallback must be 'bicubic' or 'none', got {fallback!r}")
    heat, lr_rep, std, latents = replicate_inputs(flow, lr, heat, n_samples, generator, latents, std)
    heats = tuple(float(h) for h in (heats if heats is not None else (heat / 2, heat / 4, 0.0)))
    image = flow.sample(lr_rep, heat, None, latents, std)
    bad, source, any_bad = guard(image, upper, lower)
    result = SafeSampleResult(image, bad, source, bad, heats, heat)
    if not any_bad:                                            # the guard's only sync when nothing is wrong
        return result
    image = image.clone()
    rows = bad.flatten(1).any(dim=1).nonzero().flatten()      # repair only the affected samples
    lr_sub = lr_rep.index_select(0, rows)
    std_sub = std.index_select(0, rows) if std is not None and std.shape[0] == lr_rep.shape[0] else std
    lat_sub = [z.index_select(0, rows) for z in latents]
    remaining = bad.index_select(0, rows)
    out = image.index_select(0, rows)
    src = source.index_select(0, rows)
    for k, h in enumerate(heats, start=1):
        factor = h / heat if heat > 0 else 0.0
        cooled = [torch.where(_region(remaining, z.shape[-2:], margin), z * factor, z) for z in lat_sub]
        cand = flow.sample(lr_sub, h, None, cooled, std_sub)
        fix = remaining & ~artifact_masks(cand, upper, lower)[0]
        out = torch.where(fix[:, None], cand, out)
        src = torch.where(fix, torch.full_like(src, k), src)
        remaining = remaining & ~fix
        if not bool(remaining.any()):
            break
    if fallback == "bicubic":
        up = flow.upsample(lr_sub)
        out = torch.where(remaining[:, None], up, out)
        src = torch.where(remaining, torch.full_like(src, len(heats) + 1), src)
    else:
        src = torch.where(remaining, torch.full_like(src, UNREPAIRED), src)
    image.index_copy_(0, rows, out)
    source = source.index_copy(0, rows, src)
    return SafeSampleResult(image, bad, source, artifact_masks(image, upper, lower)[0], heats, heat)


__all__ = ["safe_sample", "SafeSampleResult", "ORIGINAL", "UNREPAIRED"]
