"""The stress suite's inputs: held-out photo crops, clean and under every documented degradation.

Each :class:`Scenario` is one LR batch ``[B, 3, h, w]`` in [0, 1] (``B = budget["images"]``, ``h = w =
budget["lr_size"]``) built from held-out HR crops of side ``lr_size * scale``, taken in turn from the four
independent source photos of :data:`robustness_diag.data.photos.HELDOUT_PHOTOS` (never trained on; crop ``b`` comes
from photo ``b mod 4``, its ``source`` id): ``clean``, then per severity ``noise<k>``, ``blur<k>`` (blur-kernel
mismatch, from HR), ``jpeg<k>`` and ``exposure<k>``, then ``graphics`` (synthetic graphics images, not photos; each
image its own source, ids from :data:`GRAPHICS_SOURCE` on). The flow's ``input_domain`` maps photos to its
in-distribution inputs (low-light flows get darkened inputs, degraded after darkening as a camera would).
Randomness: the crops use a generator seeded ``seed``, the degradations one seeded ``seed + 1``, in the order
above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

#: source ids of the graphics images start here (photo sources are 0 .. len(HELDOUT_PHOTOS) - 1)
GRAPHICS_SOURCE = 100


@dataclass
class Scenario:
    """One stress condition: ``name`` (``"noise3"``), its LR batch ``lr`` ``[B, 3, h, w]``, the degradation
    ``family`` (``"clean"``, ``"noise"``, ``"blur"``, ``"jpeg"``, ``"exposure"``, ``"graphics"``), ``severity``
    (0 for clean) and ``source`` (``[B]`` int: the independent source image of each LR image)."""

    name: str
    lr: Tensor
    family: str
    severity: int
    source: Optional[np.ndarray] = None


def heldout_crops(count: int, hr_side: int, seed: int) -> tuple[Tensor, np.ndarray]:
    """``count`` HR crops ``[count, 3, hr_side, hr_side]`` of the held-out photos (no augmentation), crop ``b`` from
    photo ``b mod len(HELDOUT_PHOTOS)``, and those photo indices ``[count]`` (the crops' source ids)."""
    from robustness_diag.data.photos import HELDOUT_PHOTOS, load_photo, random_crops

    g = torch.Generator().manual_seed(seed)
    photos = [load_photo(n) for n in HELDOUT_PHOTOS]
    source = np.arange(count) % len(photos)
    crops = [random_crops([photos[int(i)]], 1, hr_side, g, augment=False) for i in source]
    return torch.cat(crops), source


def stress_scenarios(hr: Tensor, scale: int, levels, seed: int, lr_size: int,
                     domain: Optional[Callable[[Tensor], Tensor]] = None,
                     source: Optional[np.ndarray] = None) -> dict[str, Scenario]:
    """Scenario name -> :class:`Scenario` (on the CPU), in suite order. ``hr``: held-out HR crops ``[B, 3, H, W]``;
    ``levels``: severities; ``domain``: ``flow.input_domain`` (identity when None); ``source``: the crops' source
    ids ``[B]`` (None: each crop its own source)."""
    from robustness_diag.data import degradations as deg
    from robustness_diag.data.photos import downscale

    domain = domain or (lambda x: x)
    g = torch.Generator().manual_seed(seed + 1)
    lr = domain(downscale(hr, scale))
    src = np.arange(hr.shape[0]) if source is None else np.asarray(source)
    out = {"clean": Scenario("clean", lr, "clean", 0, src)}
    for lv in levels:
        for name, x, fam in ((f"noise{lv}", deg.add_noise(lr, lv, g), "noise"),
                             (f"blur{lv}", domain(deg.blur_mismatch(hr, lv, scale)), "blur"),
                             (f"jpeg{lv}", deg.jpeg(lr, lv), "jpeg"),
                             (f"exposure{lv}", deg.exposure(lr, lv), "exposure")):
            out[name] = Scenario(name, x, fam, lv, src)
    out["graphics"] = Scenario("graphics", domain(deg.graphics_lr(lr_size, scale, hr.shape[0], g)), "graphics", 1,
                               GRAPHICS_SOURCE + np.arange(hr.shape[0]))
    return out


def build_suite(flow, budget: dict, seed: int, device: torch.device) -> dict[str, Scenario]:
    """The whole stress suite for ``flow`` under ``budget``, moved to ``device``."""
    hr, source = heldout_crops(budget["images"], budget["lr_size"] * flow.scale, seed)
    suite = stress_scenarios(hr, flow.scale, budget["levels"], seed, budget["lr_size"], flow.input_domain, source)
    for s in suite.values():
        s.lr = s.lr.to(device)
    return suite
