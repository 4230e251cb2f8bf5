r"""What the folder commands (``fit``, ``score``, ``sample``) share about their inputs and outputs.

* :class:`InputOptions`: which image files, and how they become LR images;
* :func:`list_inputs` / :func:`decoder`: the files of :class:`InputOptions` and the decoder that reads one;
* :func:`to_lr`: a decoded image as the flow's LR input ``[1, 3, h, w]`` in [0, 1] (HR inputs downscaled by the
  flow's scale: bicubic with anti-aliasing, :func:`robustness_diag.data.photos.downscale`);
* :func:`config_record`: a command's configuration as recorded in ``run.json`` (callables left out);
* :func:`setup_errors`: the exception types that mean "usage or setup error" (exit code 2, nothing processed);
* :func:`flat_name`: the output-file stem of an image key (``maps/<name>.*``), shared by ``score``, ``sample`` and
  ``correlate`` (which pairs their maps by it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from typing import Optional, Sequence

DEFAULT_MIN_SIZE = 8


@dataclass
class InputOptions:
    """Which files, and how they become LR images.

    Attributes:
        images: folders, image files or file lists (see :func:`robustness_diag.data.images.list_images`).
        include, exclude: glob filters on the file keys/names. recursive: search sub-folders.
        from_hr: inputs are HR images, downscaled by the flow's scale (None in scoring: as the statistics were fitted).
        max_pixels: refuse files with more pixels. min_size: refuse LR images smaller than this (LR pixels) on a side.
        exif_orientation: apply EXIF rotation.
    """

    images: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    recursive: bool = True
    from_hr: Optional[bool] = False
    max_pixels: Optional[int] = 50_000_000
    min_size: int = DEFAULT_MIN_SIZE
    exif_orientation: bool = False


def list_inputs(inp: InputOptions) -> list:
    """The :class:`robustness_diag.data.images.ImageItem` list of ``inp``, in processing order.

    Raises:
        ValueError: no image file matched (a setup error).
        ImageListError: a folder or list file cannot be read.
    """
    from robustness_diag.data.images import list_images
    items = list_images(inp.images, include=inp.include, exclude=inp.exclude, recursive=inp.recursive)
    if not items:
        raise ValueError(f"no image files found in {', '.join(map(str, inp.images))}")
    return items


def decoder(inp: InputOptions):
    """``path -> DecodedImage`` with the pixel limit and EXIF setting of ``inp``."""
    from robustness_diag.data.images import read_image

    def decode(path):
        return read_image(path, max_pixels=inp.max_pixels, exif_orientation=inp.exif_orientation)
    return decode


def setup_errors() -> tuple:
    """Exception types that mean a usage or setup error (exit code 2): unreadable checkpoint or statistics, statistics
    of another checkpoint, unreadable file lists, an existing table without resume, bad values, missing files."""
    from robustness_diag.data.images import ImageListError
    from robustness_diag.flows.errors import CheckpointError
    from robustness_diag.ood.errors import OODError

    from .folder_run import FolderRunError
    return (CheckpointError, OODError, ImageListError, FolderRunError, ValueError, FileNotFoundError)


def config_record(cfg) -> dict:
    """A command's dataclass configuration as a dict for ``run.json`` (the ``overlay_writer`` callable left out)."""
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    d.pop("overlay_writer", None)
    return d


def to_lr(decoded, from_hr: bool, scale: int, min_size: int):
    """``(lr [1, 3, h, w], hr_size (H, W))`` of a decoded image ``[3, H, W]`` in [0, 1].

    ``from_hr``: the decoded image is HR and is downscaled by ``scale``; else it is the LR image and ``hr_size`` is
    its size times ``scale`` (the size overlays are drawn at).

    Raises:
        ValueError: the LR image would be smaller than ``min_size`` pixels on a side.
    """
    from robustness_diag.data.photos import downscale
    img = decoded.image
    H, W = int(img.shape[1]), int(img.shape[2])
    if from_hr:
        if H // scale < min_size or W // scale < min_size:
            raise ValueError(f"image too small: {W}x{H} HR pixels give {W // scale}x{H // scale} LR pixels at "
                             f"{scale}X; need at least {min_size} on each side (--min-size)")
        lr = downscale(img[None], scale)
        return lr, (H, W)
    if H < min_size or W < min_size:
        raise ValueError(f"image too small: {W}x{H} pixels; need at least {min_size} LR pixels on each side "
                         f"(--min-size)")
    return img[None], (H * scale, W * scale)


def flat_name(key: str) -> str:
    """The output-file stem of an image key: the key without its extension, folders joined by ``__``
    (``"sub/a.png"`` -> ``"sub__a"``); ``"image"`` for an empty key."""
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return stem.replace("\\", "/").strip("/").replace("/", "__").replace(":", "_") or "image"


__all__ = ["DEFAULT_MIN_SIZE", "InputOptions", "list_inputs", "decoder", "setup_errors", "config_record", "to_lr",
           "flat_name"]
