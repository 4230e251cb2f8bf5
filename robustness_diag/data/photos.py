"""Natural photos that ship inside pip packages (no download), as float RGB tensors, plus HR/LR pair making.

Splits: never train on what is evaluated on. The training recipes use :data:`TRAIN_PHOTOS` and validate on
:data:`VALIDATION_PHOTOS`; the audit's stress suite draws its held-out crops from :data:`HELDOUT_PHOTOS`, four
independent source photos none of which any bundled flow was trained on (scikit-image's ``chelsea``,
scikit-learn's ``china.jpg`` and ``flower.jpg``, Matplotlib's ``grace_hopper.jpg``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: scikit-image sample photos (all in the wheel). ``stereo_motorcycle`` gives two near-identical views: only the
#: left one is used, for training, so no validation view leaks.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left")
VALIDATION_PHOTOS = ("chelsea",)
#: held-out source photos of the audit's stress suite (each an independent source for the statistics)
HELDOUT_PHOTOS = ("chelsea", "china", "flower", "grace_hopper")
#: photos that ship with other pip packages than scikit-image: name -> (package, file)
_OTHER_PHOTOS = {"china": ("sklearn", "china.jpg"), "flower": ("sklearn", "flower.jpg"),
                 "grace_hopper": ("matplotlib", "grace_hopper.jpg")}


def _other_photo(name: str):
    """The uint8 ``[H, W, 3]`` array of a photo of :data:`_OTHER_PHOTOS` (read from the installed package)."""
    import numpy as np
    from PIL import Image

    package, file = _OTHER_PHOTOS[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image
        return load_sample_image(file)
    import matplotlib.cbook as cbook
    with cbook.get_sample_data(file) as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def load_photo(name: str) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] of a scikit-image sample photo or one of :data:`HELDOUT_PHOTOS` (gray is
    repeated to RGB, alpha dropped)."""
    import numpy as np
    from skimage import data
    if name in _OTHER_PHOTOS:
        img = _other_photo(name)
    elif name == "motorcycle_left":
        img = data.stereo_motorcycle()[0]
    elif name == "motorcycle_right":
        img = data.stereo_motorcycle()[1]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    # a copy: packages may hand out read-only arrays
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / scale


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """LR from HR ``[B, 3, H, W]``: bicubic with anti-aliasing (torch), clamped to [0, 1]."""
    return F.interpolate(hr, scale_factor=1.0 / scale, mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


def random_crops(images: list, n: int, size: int, generator: torch.Generator, augment: bool = True) -> torch.Tensor:
    """``[n, 3, size, size]`` random crops from ``images`` (each ``[3, H, W]``), with random flips/rot90."""
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=generator))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=generator))
        crop = img[:, y:y + size, x:x + size]
        if augment:
            k = int(torch.randint(4, (1,), generator=generator))
            crop = torch.rot90(crop, k, dims=(1, 2))
            if bool(torch.randint(2, (1,), generator=generator)):
                crop = crop.flip(2)
        out.append(crop)
    return torch.stack(out)
