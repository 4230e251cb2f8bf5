"""The stress suite's inputs: held-out photo crops, clean and under every documented degradation.

Each :class:`Scenario` is one LR batch ``[B, 3, h, w]`` in [0, 1] (``B = budget["images"]``, ``h = w =
budget["lr_size"]``) built from held-out HR crops (the validation photos, never trained on) of side
``lr_size * scale``: ``clean``, then per severity ``noise<k>``, ``blur<k>`` (blur-kernel mismatch, from HR),
``jpeg<k>`` and ``exposure<k>``, then ``graphics`` (synthetic graphics images, not photos). The flow's
``input_domain`` maps photos to its in-distribution inputs (low-light flows get darkened inputs, degraded after
darkening as a camera would). Randomness: the crops use a generator seeded ``seed``, the degradations one seeded
``seed + 1``, in the order above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class Scenario:
    """One stress condition: ``name`` (``"noise3"``), its LR batch ``lr`` ``[B, 3, h, w]``, the degradation
    ``family`` (``"clean"``, ``"noise"``, ``"blur"``, ``"jpeg"``, ``"exposure"``, ``"graphics"``) and ``severity``
    (0 for clean)."""

    name: str
    lr: Tensor
    family: str
    severity: int


def heldout_crops(count: int, hr_side: int, seed: int) -> Tensor:
    """``count`` HR crops ``[count, 3, hr_side, hr_side]`` of the held-out validation photos (no augmentation)."""
    from robustness_diag.data.photos import VALIDATION_PHOTOS, load_photo, random_crops

    return random_crops([load_photo(n) for n in VALIDATION_PHOTOS], count, hr_side,
                        torch.Generator().manual_seed(seed), augment=False)


def stress_scenarios(hr: Tensor, scale: int, levels, seed: int, lr_size: int,
                     domain: Optional[Callable[[Tensor], Tensor]] = None) -> dict[str, Scenario]:
    """Scenario name -> :class:`Scenario` (on the CPU), in suite order. ``hr``: held-out HR crops ``[B, 3, H, W]``;
    ``levels``: severities; ``domain``: ``flow.input_domain`` (identity when None)."""
    from robustness_diag.data import degradations as deg
    from robustness_diag.data.photos import downscale

    domain = domain or (lambda x: x)
    g = torch.Generator().manual_seed(seed + 1)
    lr = domain(downscale(hr, scale))
    out = {"clean": Scenario("clean", lr, "clean", 0)}
    for lv in levels:
        for name, x, fam in ((f"noise{lv}", deg.add_noise(lr, lv, g), "noise"),
                             (f"blur{lv}", domain(deg.blur_mismatch(hr, lv, scale)), "blur"),
                             (f"jpeg{lv}", deg.jpeg(lr, lv), "jpeg"),
                             (f"exposure{lv}", deg.exposure(lr, lv), "exposure")):
            out[name] = Scenario(name, x, fam, lv)
    out["graphics"] = Scenario("graphics", domain(deg.graphics_lr(lr_size, scale, hr.shape[0], g)), "graphics", 1)
    return out


def build_suite(flow, budget: dict, seed: int, device: torch.device) -> dict[str, Scenario]:
    """The whole stress suite for ``flow`` under ``budget``, moved to ``device``."""
    hr = heldout_crops(budget["images"], budget["lr_size"] * flow.scale, seed)
    suite = stress_scenarios(hr, flow.scale, budget["levels"], seed, budget["lr_size"], flow.input_domain)
    for s in suite.values():
        s.lr = s.lr.to(device)
    return suite
