r"""Image files in, float RGB tensors out: listing folders and file lists, and decoding with reasons on failure.

Conventions (ARCHITECTURE.md): decoded images are float32 tensors ``[3, H, W]`` in [0, 1], RGB. 8- and 16-bit files
are supported (divided by 255 or 65535); gray is repeated to RGB, alpha is dropped, and every such conversion is
*said* in :attr:`DecodedImage.notes`. EXIF orientation is ignored unless asked for.

Formats: PNG, JPEG, WebP, BMP (Pillow; 16-bit PNG through OpenCV, since Pillow reduces 16-bit RGB to 8 bits) and
TIFF (tifffile: 8/16-bit, gray/RGB/RGBA, float). A file that cannot be used raises :class:`ImageReadError`, whose
message names the file and the reason (empty file, not an image, truncated data, too many pixels, ...).

Example:
    >>> items = list_images(["photos/"], include=["*.png"])          # doctest: +SKIP
    >>> img = read_image(items[0].path); img.image.shape, img.notes  # doctest: +SKIP
    (torch.Size([3, 480, 640]), ['alpha channel dropped (RGBA)'])
"""
from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

#: Extensions picked up when a folder is listed (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
#: Extensions of plain-text file lists (one image path per line, relative to the list's folder, ``#`` comments).
LIST_EXTENSIONS = (".txt", ".lst", ".list")
#: Default limit on decoded pixels (H x W) per file; larger files are refused before decoding.
DEFAULT_MAX_PIXELS = 50_000_000

PathLike = Union[str, os.PathLike]


class ImageReadError(Exception):
    """A file that could not be turned into an image. ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageListError(Exception):
    """An input given on the command line (folder, file or list) that does not exist or cannot be read."""


@dataclass(frozen=True)
class ImageItem:
    """One input file. ``key`` is its stable identity (a POSIX path relative to the inputs' common folder): it names
    the row in result tables and is what ``--resume`` matches on."""

    path: Path
    key: str


@dataclass
class DecodedImage:
    """A decoded file.

    Attributes:
        image: ``[3, H, W]`` float32 in [0, 1], RGB.
        path: the file.
        format: container format (``"PNG"``, ``"JPEG"``, ``"TIFF"``, ...).
        bit_depth: bits per sample of the stored data (8, 16, or 32 for float TIFF).
        source_mode: channel layout as stored (``"RGB"``, ``"RGBA"``, ``"L"``, ``"LA"``, ``"P"``, ``"CMYK"``, ...).
        notes: conversions applied, in words (gray -> RGB, alpha dropped, 16-bit, ...).
    """

    image: torch.Tensor
    path: Path
    format: str
    bit_depth: int
    source_mode: str
    notes: list = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])


# ---------------------------------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------------------------------

def _is_list_file(p: Path) -> bool:
    return p.suffix.lower() in LIST_EXTENSIONS


def _read_list(p: Path) -> list[Path]:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImageListError(f"{p}: cannot read file list ({e})") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line).expanduser()
        out.append(q if q.is_absolute() else p.parent / q)
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    name = key.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns)


def list_images(inputs: Iterable[PathLike], *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageItem]:
    """Lists the image files named by ``inputs``, sorted by key, without opening them.

    Arguments:
        inputs: folders (searched recursively unless ``recursive=False``; only files whose extension is in
            ``extensions``), image files (taken whatever their extension), and file lists (``.txt``/``.lst``/
            ``.list``: one path per line, relative to the list's folder; listed files that do not exist are kept, so
            that they show up as failed rows).
        include: glob patterns (fnmatch, matched against the key and the file name); if given, a file must match one.
        exclude: glob patterns; a file matching any is dropped.

    Returns:
        ``ImageItem``s sorted by key; a file named twice appears once.

    Raises:
        ImageListError: an input that does not exist or a list that cannot be read.
    """
    exts = {e.lower() for e in extensions}
    found: list[Path] = []
    roots: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            roots.append(p.resolve())
            it = p.rglob("*") if recursive else p.glob("*")
            try:
                found += [q for q in it if q.suffix.lower() in exts and q.is_file()]
            except OSError as e:
                raise ImageListError(f"{p}: cannot list folder ({e})") from None
        elif p.is_file() and _is_list_file(p):
            entries = _read_list(p)
            found += entries
            roots += [e.resolve().parent for e in entries]
        elif p.is_file():
            found.append(p)
            roots.append(p.resolve().parent)
        else:
            raise ImageListError(f"{p}: no such file or folder")
    resolved = []
    seen = set()
    for q in found:
        r = q.resolve()
        if r not in seen:
            seen.add(r)
            resolved.append(r)
    if not resolved:
        return []
    try:
        common = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path("/")
    except ValueError:  # different drives (Windows)
        common = None
    items = []
    for r in resolved:
        try:
            key = r.relative_to(common).as_posix() if common is not None else r.as_posix()
        except ValueError:
            key = r.as_posix()
        if include and not _matches(key, include):
            continue
        if exclude and _matches(key, exclude):
            continue
        items.append(ImageItem(r, key))
    return sorted(items, key=lambda it: it.key)


# ---------------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------------

def _too_many(path, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ImageReadError(path, f"image is {w}x{h} = {h * w:,} pixels, over the limit of {max_pixels:,} "
                                   f"(raise --max-pixels to allow it)")


def _to_tensor(arr: np.ndarray, path, notes: list) -> tuple[torch.Tensor, int]:
    """``[H, W]`` or ``[H, W, C]`` array (uint8, uint16, bool, float) -> ``[3, H, W]`` float32 in [0, 1]."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
        gray = True
    elif arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        gray = arr.shape[2] == 2
    else:
        raise ImageReadError(path, f"unsupported pixel layout: array of shape {arr.shape} (need H x W gray, "
                                   f"or H x W x 2/3/4 channels)")
    if arr.shape[2] in (2, 4):
        notes.append(f"alpha channel dropped ({'LA' if arr.shape[2] == 2 else 'RGBA'})")
        arr = arr[..., :-1]
    if gray:
        notes.append("grayscale repeated to RGB")
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        bits, x = 8, arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        bits, x = 16, arr.astype(np.float32) / 65535.0
        notes.append("16-bit")
    elif arr.dtype == bool:
        bits, x = 1, arr.astype(np.float32)
        notes.append("1-bit")
    elif arr.dtype.kind == "f":
        bits = 8 * arr.dtype.itemsize
        x = arr.astype(np.float32)
        if not np.isfinite(x).all():
            raise ImageReadError(path, "floating-point image holds NaN or Inf values")
        if x.min() < 0 or x.max() > 1:
            notes.append(f"float image clipped to [0, 1] (range was {x.min():.4g} .. {x.max():.4g})")
            x = np.clip(x, 0, 1)
        notes.append(f"{bits}-bit float")
    elif arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        hi = float(arr.max()) if arr.size else 0.0
        if arr.min() < 0 or hi > 65535:
            raise ImageReadError(path, f"unsupported sample type {arr.dtype} with values outside 0..65535")
        scale = 255.0 if hi <= 255 and info.bits <= 8 else 65535.0
        bits, x = (8 if scale == 255.0 else 16), arr.astype(np.float32) / scale
        if bits == 16:
            notes.append("16-bit")
    else:
        raise ImageReadError(path, f"unsupported sample type {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), bits


def _read_tiff(path: Path, max_pixels: Optional[int]) -> DecodedImage:
    import tifffile
    notes: list = []
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise ImageReadError(path, "TIFF file holds no image")
            page = tif.pages[0]
            axes = page.axes
            shape = page.shape
            hw = [shape[axes.index(a)] for a in "YX"] if ("Y" in axes and "X" in axes) else list(shape[:2])
            _too_many(path, int(hw[0]), int(hw[1]), max_pixels)
            if len(tif.pages) > 1:
                notes.append(f"first of {len(tif.pages)} TIFF pages used")
            arr = page.asarray()
            photometric = getattr(page.photometric, "name", str(page.photometric))
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ImageReadError(path, f"cannot decode TIFF ({type(e).__name__}: {e})") from None
    if axes.startswith("S") and arr.ndim == 3:  # planar: samples first
        arr = np.moveaxis(arr, 0, -1)
    if "MINISWHITE" in photometric.upper():
        notes.append("min-is-white photometric inverted")
        arr = (np.iinfo(arr.dtype).max - arr) if arr.dtype.kind in "ui" else 1.0 - arr
    mode = {2: "L", 3: "L"}.get(arr.ndim, "?")
    if arr.ndim == 3:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(arr.shape[2], f"{arr.shape[2]}-channel")
    image, bits = _to_tensor(arr, path, notes)
    return DecodedImage(image, path, "TIFF", bits, mode, notes)


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(26)
    return head[24] if len(head) >= 25 and head[:8] == b"\x89PNG\r\n\x1a\n" else 8


def _read_png16(path: Path, mode: str) -> np.ndarray:
    import cv2
    buf = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "truncated or corrupt 16-bit PNG data")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    return arr


def read_image(path: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               exif_orientation: bool = False) -> DecodedImage:
    """Decodes one file to a ``[3, H, W]`` float32 RGB tensor in [0, 1] (see the module docstring).

    Arguments:
        path: the file (PNG, JPEG, WebP, BMP, TIFF; the content decides, not the extension).
        max_pixels: refuse files with more than this many pixels (checked from the header, before decoding);
            ``None`` for no limit.
        exif_orientation: apply the EXIF orientation tag (ignored by default, as the reference pipelines do).

    Raises:
        ImageReadError: naming the file and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot access file ({e.strerror or e})") from None
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from None
    if magic[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _read_tiff(path, max_pixels)

    from PIL import Image, ImageOps, UnidentifiedImageError
    notes: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None   # our own limit is checked from the header right after opening
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageReadError(path, f"not a recognised image file (PNG, JPEG, WebP, TIFF or BMP); it starts with "
                                       f"{magic!r}") from None
        except Image.DecompressionBombError as e:
            raise ImageReadError(path, f"image is too large ({e})") from None
        except Exception as e:
            raise ImageReadError(path, f"cannot open image ({type(e).__name__}: {e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            fmt = im.format or "?"
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageReadError(path, f"image header declares an empty size {w}x{h}")
            _too_many(path, h, w, max_pixels)
            mode = im.mode
            try:
                if fmt == "PNG" and _png_bit_depth(path) == 16 and mode not in ("I;16", "I;16B", "I;16L", "I"):
                    arr = _read_png16(path, mode)
                    mode = {2: "L", 3: "RGB", 4: "RGBA"}.get(arr.shape[2] if arr.ndim == 3 else 2, mode)
                else:
                    im.load()
                    if exif_orientation:
                        im = ImageOps.exif_transpose(im)
                        notes.append("EXIF orientation applied")
                    arr = _pil_to_array(im, notes)
            except ImageReadError:
                raise
            except Image.DecompressionBombError as e:
                raise ImageReadError(path, f"image is too large ({e})") from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                msg = str(e) or type(e).__name__
                raise ImageReadError(path, f"truncated or corrupt {fmt} data ({msg})") from None
    if exif_orientation and fmt == "PNG" and "EXIF orientation applied" not in notes:
        notes.append("EXIF orientation not applied to 16-bit PNG")
    image, bits = _to_tensor(arr, path, notes)
    if image.shape[1] != h or image.shape[2] != w:  # EXIF rotation swaps sizes; anything else is a decoder bug
        if not exif_orientation:
            raise ImageReadError(path, f"decoded size {image.shape[2]}x{image.shape[1]} differs from the header "
                                       f"{w}x{h}")
    return DecodedImage(image, path, fmt, bits, mode, notes)


def _pil_to_array(im, notes: list) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        has_alpha = "transparency" in im.info
        notes.append("palette image converted to RGB")
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        return np.asarray(im.convert("L"))
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        notes.append(f"converted from {mode} to RGB")
        im = im.convert("RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(im)
        return arr.astype(np.uint16) if arr.size and arr.min() >= 0 and arr.max() <= 65535 else arr
    elif mode == "F":
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im)
