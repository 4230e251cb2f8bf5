r"""Image files in, float RGB tensors out: listing folders and file lists, and decoding with reasons on failure.

Conventions (ARCHITECTURE.md): decoded images are float32 tensors ``[3, H, W]`` in [0, 1], RGB. Every file is read
by its *declared* photometric interpretation and bit depth, and every conversion is said in
:attr:`DecodedImage.notes`; what cannot be read exactly is refused with a reason (:class:`ImageReadError`):

* unsigned integers are divided by their declared range: 1-bit by 1, 8-bit by 255, 16-bit by 65535 (PNG and TIFF),
  other TIFF depths by ``2**bits - 1``, 32-bit by 4294967295 (a 32-bit file whose largest value is at most 65535,
  e.g. 8-bit data stored as 32-bit, would read as black and is refused); signed integers are refused;
* floats (TIFF) are used as stored when finite and in [0, 1]; NaN/Inf or values outside [0, 1] are refused;
* gray is repeated to RGB, alpha (and other extra channels) dropped, palettes (with or without transparency) expanded,
  CMYK converted as ``R = (1-C)(1-K)`` (no colour management), TIFF min-is-white inverted; YCbCr and CIELab pixel
  data are refused (JPEG-compressed YCbCr TIFFs, decoded to RGB by the JPEG codec, are accepted);
* multi-page TIFFs, animated PNG/GIF/WebP and multi-picture JPEGs: the first frame is used and the note says so.

EXIF orientation is ignored unless asked for.

Formats: PNG, JPEG, WebP, BMP, GIF (Pillow; 16-bit PNG through OpenCV, since Pillow reduces 16-bit RGB to 8 bits)
and TIFF (tifffile; compressions tifffile cannot decode without ``imagecodecs``, e.g. LZW or JPEG, through Pillow
where Pillow keeps the declared depth). The reason of an :class:`ImageReadError` names the file (empty file, not an
image, truncated data, too many pixels, unsupported encoding, ...).

Listing (:func:`list_images`) accounts for every entry it sees: the returned :class:`ImageList` carries a
:class:`ScanReport` with the entries used and those skipped, counted per reason (unsupported extension, hidden,
dangling symlink, symlink loop, excluded by a filter, ...).

Example:
    >>> items = list_images(["photos/"], include=["*.png"])          # doctest: +SKIP
    >>> img = read_image(items[0].path); img.image.shape, img.notes  # doctest: +SKIP
    (torch.Size([3, 480, 640]), ['alpha channel dropped (RGBA)'])
    >>> items.scan.describe()                                       # doctest: +SKIP
    '25 entries: 19 images used, 3 unsupported extension (.txt, .json), 1 dangling symlink (a.png), ...'
"""
from __future__ import annotations

import errno
import fnmatch
import os
import stat
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
        bit_depth: declared bits per sample of the stored data (1, 8, 16, 32, ...).
        source_mode: channel layout as stored (``"RGB"``, ``"RGBA"``, ``"L"``, ``"LA"``, ``"P"``, ``"CMYK"``, ...).
        notes: conversions applied, in words (gray -> RGB, alpha dropped, 16-bit, first frame, ...).
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

#: Reasons a listed entry is not used, in the order they are reported.
SKIP_REASONS = ("unsupported extension", "hidden", "dangling symlink", "symlink loop",
                "symlink to a folder (not followed)", "folder not searched (not recursive)",
                "folder excluded by --exclude", "excluded by --exclude",
                "not matched by --include", "duplicate (same file listed already)", "not a regular file",
                "unreadable entry")


@dataclass
class ScanReport:
    """Every entry a listing saw: ``used`` images plus the skipped ones, per reason (``entries = used + skipped``).

    Attributes:
        used: entries that became :class:`ImageItem` objects.
        skipped: reason -> names (keys relative to the inputs' common folder; folders end with ``/``).
        extensions: for ``"unsupported extension"``: extension -> count (``"(none)"`` for names without one).
    """

    used: int = 0
    skipped: dict = field(default_factory=dict)
    extensions: dict = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return self.used + sum(len(v) for v in self.skipped.values())

    def skip(self, reason: str, name: str, ext: Optional[str] = None) -> None:
        self.skipped.setdefault(reason, []).append(name)
        if ext is not None:
            self.extensions[ext] = self.extensions.get(ext, 0) + 1

    def _ordered(self) -> list:
        known = [r for r in SKIP_REASONS if r in self.skipped]
        return known + sorted(r for r in self.skipped if r not in SKIP_REASONS)

    def describe(self, max_names: int = 3) -> str:
        """One line, e.g. ``"25 entries: 19 images used, 3 unsupported extension (.txt, .json), 1 dangling symlink
        (a.png)"``."""
        parts = [f"{self.used} image{'s' if self.used != 1 else ''} used"]
        for reason in self._ordered():
            names = self.skipped[reason]
            if reason == "unsupported extension":
                shown = sorted(self.extensions, key=lambda e: (-self.extensions[e], e))
            else:
                shown = list(names)
            more = ", ..." if len(shown) > max_names else ""
            parts.append(f"{len(names)} {reason} ({', '.join(shown[:max_names])}{more})")
        n = self.entries
        return f"{n} entr{'ies' if n != 1 else 'y'}: " + ", ".join(parts)

    def to_dict(self, max_names: int = 10) -> dict:
        """For run.json: ``{"entries", "used", "skipped": {reason: {"count", "first": [names]}}}`` (the unsupported
        extension reason also has ``"extensions": {ext: count}``)."""
        skipped = {}
        for reason in self._ordered():
            names = self.skipped[reason]
            skipped[reason] = {"count": len(names), "first": list(names[:max_names])}
            if reason == "unsupported extension":
                skipped[reason]["extensions"] = dict(sorted(self.extensions.items()))
        return {"entries": self.entries, "used": self.used, "skipped": skipped}


class ImageList(list):
    """A list of :class:`ImageItem` that also carries the :class:`ScanReport` of the listing (``.scan``)."""

    def __init__(self, items: Iterable = (), scan: Optional[ScanReport] = None):
        super().__init__(items)
        self.scan = scan if scan is not None else ScanReport(used=len(self))


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
    name = key.rstrip("/").rsplit("/", 1)[-1]
    key = key.rstrip("/")
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _rel(p: Path, common: Optional[Path]) -> str:
    if common is not None:
        try:
            return p.relative_to(common).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def _scan_folder(root: Path, common: Optional[Path], *, recursive: bool, exts: set, exclude: Sequence[str],
                 report: ScanReport, found: list) -> None:
    """Walks ``root`` (symlinks to files followed, symlinks to folders not), appending candidate image files to
    ``found`` and every other entry to ``report`` with its reason."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if d == root:
                raise ImageListError(f"{root}: cannot list folder ({e.strerror or e})") from None
            report.skip("unreadable entry", _rel(d, common) + "/")
            continue
        subdirs = []
        for e in entries:
            p = Path(e.path)
            name = _rel(p, common)
            is_link = e.is_symlink()
            try:
                st = os.stat(p)                 # follows symlinks
            except OSError as err:
                if e.name.startswith("."):
                    report.skip("hidden", name)
                elif err.errno == errno.ELOOP:
                    report.skip("symlink loop", name)
                elif is_link and err.errno in (errno.ENOENT, errno.ENOTDIR):
                    report.skip("dangling symlink", name)
                else:
                    report.skip("unreadable entry", name)
                continue
            if stat.S_ISDIR(st.st_mode):
                name += "/"
                if e.name.startswith("."):
                    report.skip("hidden", name)
                elif is_link:
                    report.skip("symlink to a folder (not followed)", name)
                elif exclude and _matches(name, exclude):
                    report.skip("folder excluded by --exclude", name)
                elif not recursive:
                    report.skip("folder not searched (not recursive)", name)
                else:
                    subdirs.append(p)
                continue
            if e.name.startswith("."):
                report.skip("hidden", name)
            elif not stat.S_ISREG(st.st_mode):
                report.skip("not a regular file", name)
            elif p.suffix.lower() not in exts:
                report.skip("unsupported extension", name, ext=p.suffix.lower() or "(none)")
            else:
                found.append(p)
        stack.extend(reversed(subdirs))


def list_images(inputs: Iterable[PathLike], *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageList:
    """Lists the image files named by ``inputs``, sorted by key, without opening them.

    Arguments:
        inputs: folders (searched recursively unless ``recursive=False``; only files whose extension is in
            ``extensions``; hidden entries (``.name``) skipped; symlinks to files followed, to folders not), image
            files (taken whatever their extension; a named file with one of ``extensions`` that does not exist is
            kept, so that it shows up as a failed row), and file lists (``.txt``/``.lst``/``.list``: one path per
            line, relative to the list's folder; listed files that do not exist are kept too).
        include: glob patterns (fnmatch, matched against the key and the file name); if given, a file must match one.
        exclude: glob patterns; a file matching any is dropped, and so is a folder matching any (with its content).

    Returns:
        an :class:`ImageList` of ``ImageItem`` objects sorted by key (a file named twice appears once); its ``.scan``
        (:class:`ScanReport`) accounts for every entry seen: used, or skipped with the reason.

    Raises:
        ImageListError: a folder or list that does not exist, or a list that cannot be read.
    """
    exts = {e.lower() for e in extensions}
    report = ScanReport()
    plan: list[tuple[str, Path]] = []      # ("dir", folder) | ("file", path)
    roots: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            roots.append(p.resolve())
            plan.append(("dir", p.resolve()))
        elif p.is_file() and _is_list_file(p):
            entries = _read_list(p)
            plan += [("file", e) for e in entries]
            roots += [e.resolve().parent for e in entries]
        elif p.is_file() or (not p.exists() and p.suffix.lower() in exts):
            plan.append(("file", p))         # a missing image file is kept: it becomes a failed row, the rest runs
            roots.append(p.resolve().parent)
        else:
            raise ImageListError(f"{p}: no such file or folder")
    try:
        common = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path("/")
    except ValueError:  # different drives (Windows)
        common = None
    found: list[Path] = []
    for kind, p in plan:
        if kind == "dir":
            _scan_folder(p, common, recursive=recursive, exts=exts, exclude=exclude, report=report, found=found)
        else:
            found.append(p)
    items = []
    seen = set()
    for q in found:
        r = q.resolve()
        key = _rel(r, common)
        if r in seen:
            report.skip("duplicate (same file listed already)", _rel(q.absolute(), common))
            continue
        seen.add(r)
        if include and not _matches(key, include):
            report.skip("not matched by --include", key)
            continue
        if exclude and _matches(key, exclude):
            report.skip("excluded by --exclude", key)
            continue
        items.append(ImageItem(r, key))
    report.used = len(items)
    return ImageList(sorted(items, key=lambda it: it.key), report)


# ---------------------------------------------------------------------------------------------------------------------
# decoding: samples -> [0, 1] by the declared range, channels -> RGB
# ---------------------------------------------------------------------------------------------------------------------

def _too_many(path, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ImageReadError(path, f"image is {w}x{h} = {h * w:,} pixels, over the limit of {max_pixels:,} "
                                   f"(raise --max-pixels to allow it)")


def _scale(arr: np.ndarray, path, notes: list, bits: Optional[int] = None, *,
           invert: bool = False) -> tuple[np.ndarray, int]:
    """Samples -> float32 in [0, 1] by their declared range; ``(x, bits)``.

    Unsigned integers are divided by ``2**bits - 1`` (``bits``: the declared depth, default the dtype's), bool is
    1-bit; floats must be finite and in [0, 1]; anything else is refused. ``invert``: min-is-white (``max - v``)."""
    if arr.dtype == bool:
        notes.append("1-bit")
        x = arr if not invert else ~arr
        return x.astype(np.float32), 1
    kind = arr.dtype.kind
    if kind == "u":
        bits = int(bits or 8 * arr.dtype.itemsize)
        if bits > 32:
            raise ImageReadError(path, f"{bits}-bit integer samples are not supported (at most 32 bits)")
        top = (1 << bits) - 1
        hi = int(arr.max()) if arr.size else 0
        if hi > top:
            raise ImageReadError(path, f"sample values up to {hi} exceed the declared {bits}-bit range 0..{top}")
        if bits == 32 and hi <= 65535:
            raise ImageReadError(path, f"32-bit integer samples whose largest value is {hi}: divided by their "
                                       f"declared range (4294967295) the image would be black, so it was probably "
                                       f"written from 8- or 16-bit data; save it as 8- or 16-bit")
        if invert:
            arr = top - arr
        if bits <= 16:
            x = arr.astype(np.float32) / np.float32(top)
        else:
            x = (arr.astype(np.float64) / top).astype(np.float32)
        if bits == 16:
            notes.append("16-bit")
        elif bits == 1:
            notes.append("1-bit")
        elif bits != 8:
            notes.append(f"{bits}-bit integer (divided by {top})")
        return x, bits
    if kind == "i":
        raise ImageReadError(path, f"signed {8 * arr.dtype.itemsize}-bit integer samples are not supported (no "
                                   f"declared range for them); save the image as unsigned 8- or 16-bit")
    if kind == "f":
        bits = 8 * arr.dtype.itemsize
        x = arr.astype(np.float32)
        if not np.isfinite(x).all():
            raise ImageReadError(path, f"{bits}-bit float image holds NaN or Inf values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise ImageReadError(path, f"{bits}-bit float samples range {lo:.6g} .. {hi:.6g}, outside [0, 1]; "
                                       f"float images are accepted only with values in [0, 1] (rescale them first)")
        if invert:
            x = 1.0 - x
        notes.append(f"{bits}-bit float (values in [0, 1] used as stored)")
        return x, bits
    raise ImageReadError(path, f"unsupported sample type {arr.dtype}")


def _layout(x: np.ndarray, path, notes: list) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, C]`` float in [0, 1] (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> ``[3, H, W]``."""
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = x[..., None]
        gray = True
    elif x.ndim == 3 and x.shape[2] in (2, 3, 4):
        gray = x.shape[2] == 2
    else:
        raise ImageReadError(path, f"unsupported pixel layout: array of shape {x.shape} (need H x W gray, "
                                   f"or H x W x 2/3/4 channels)")
    if x.shape[2] in (2, 4):
        notes.append(f"alpha channel dropped ({'LA' if x.shape[2] == 2 else 'RGBA'})")
        x = x[..., :-1]
    if gray:
        notes.append("grayscale repeated to RGB")
        x = np.repeat(x, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


def _cmyk_to_rgb(arr: np.ndarray, path, notes: list, bits: Optional[int], icc: bool) -> tuple[np.ndarray, int]:
    """``[H, W, 4(+extra)]`` ink amounts -> float RGB ``(1-C)(1-K), (1-M)(1-K), (1-Y)(1-K)``."""
    x, bits = _scale(arr[..., :4], path, notes, bits)
    rgb = (1.0 - x[..., :3]) * (1.0 - x[..., 3:4])
    notes.append("CMYK converted to RGB as (1-C)(1-K), (1-M)(1-K), (1-Y)(1-K), without colour management"
                 + ("; embedded ICC profile not applied" if icc else ""))
    if arr.shape[2] > 4:
        notes.append(f"{arr.shape[2] - 4} extra channel(s) after CMYK dropped")
    return rgb.astype(np.float32), bits


# ---------------------------------------------------------------------------------------------------------------------
# TIFF (tifffile; Pillow for compressions tifffile cannot decode without imagecodecs)
# ---------------------------------------------------------------------------------------------------------------------

_PHOTOMETRIC = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB", 3: "PALETTE", 4: "MASK", 5: "SEPARATED", 6: "YCBCR",
                8: "CIELAB", 9: "ICCLAB", 10: "ITULAB", 32803: "CFA", 32844: "LOGL", 32845: "LOGLUV",
                34892: "LINEAR_RAW"}
_SAMPLEFORMAT = {1: "unsigned integer", 2: "signed integer", 3: "float", 4: "untyped", 5: "complex integer",
                 6: "complex float"}


def _enum_int(v, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _read_tiff(path: Path, max_pixels: Optional[int]) -> DecodedImage:
    import tifffile
    notes: list = []
    codec_error = None
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise ImageReadError(path, "TIFF file holds no image")
            page = tif.pages[0]
            axes, shape = page.axes, page.shape
            hw = [shape[axes.index(a)] for a in "YX"] if ("Y" in axes and "X" in axes) else list(shape[:2])
            _too_many(path, int(hw[0]), int(hw[1]), max_pixels)
            n_pages = len(tif.pages)
            photometric = _enum_int(page.photometric, -1)
            bits = int(page.bitspersample)
            sampleformat = _enum_int(page.sampleformat, 1)
            extrasamples = tuple(_enum_int(e) for e in (page.extrasamples or ()))
            compression = getattr(page.compression, "name", str(page.compression))
            colormap = page.colormap
            inkset = page.tags.valueof(332, 1)
            icc = 34675 in page.tags
            try:
                arr = page.asarray()
            except Exception as e:
                if "imagecodecs" not in str(e):
                    raise
                arr, codec_error = None, str(e)
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ImageReadError(path, f"cannot decode TIFF ({type(e).__name__}: {e})") from None
    pname = _PHOTOMETRIC.get(photometric, f"photometric {photometric}")
    if n_pages > 1:
        notes.append(f"first of {n_pages} TIFF pages used")
    if photometric in (8, 9, 10):
        raise ImageReadError(path, f"{pname} (L*a*b*) TIFF is not supported; convert it to RGB")
    if photometric == 6 and "JPEG" not in compression.upper():
        raise ImageReadError(path, "YCbCr TIFF without JPEG compression is not supported; convert it to RGB")
    if photometric not in (0, 1, 2, 3, 5, 6):
        raise ImageReadError(path, f"TIFF photometric interpretation {pname} is not supported")
    if sampleformat not in (1, 3):
        raise ImageReadError(path, f"TIFF {_SAMPLEFORMAT.get(sampleformat, sampleformat)} samples "
                                   f"({bits}-bit) are not supported; save as unsigned 8- or 16-bit or float in [0, 1]")
    if photometric == 5 and inkset != 1:
        raise ImageReadError(path, f"separated (ink) TIFF with InkSet {inkset} is not CMYK; not supported")
    if arr is None:
        return _read_tiff_pillow(path, notes, pname, photometric, bits, sampleformat, compression, codec_error, icc)

    if set(axes) - set("YXS"):
        raise ImageReadError(path, f"TIFF page with axes {axes} (a stack or volume in one page) is not supported")
    order = [axes.index("Y"), axes.index("X")] + ([axes.index("S")] if "S" in axes else [])
    arr = arr.transpose(order)
    if arr.ndim == 2:
        arr = arr[..., None]
    n_color = {0: 1, 1: 1, 2: 3, 3: 1, 5: 4, 6: 3}[photometric]
    if arr.shape[2] < n_color:
        raise ImageReadError(path, f"{pname} TIFF with {arr.shape[2]} sample(s) per pixel (needs {n_color})")
    n_extra = arr.shape[2] - n_color
    alpha = bool(extrasamples) and extrasamples[0] in (1, 2) and photometric in (0, 1, 2)
    if n_extra and not alpha:
        notes.append(f"{n_extra} extra sample channel(s) dropped (not alpha)")
    elif n_extra > 1:
        notes.append(f"{n_extra - 1} extra sample channel(s) after alpha dropped")
    if alpha and extrasamples[0] == 1:
        notes.append("associated (premultiplied) alpha: colours left as stored")
    keep = n_color + (1 if alpha else 0)
    arr = arr[..., :keep]
    mode = {0: "L", 1: "L", 2: "RGB", 3: "P", 5: "CMYK", 6: "RGB"}[photometric] + ("A" if alpha else "")
    if photometric == 6:
        notes.append("YCbCr (JPEG-compressed) converted to RGB by the JPEG codec")
    if photometric == 3:
        x, bits = _tiff_palette(arr[..., 0], colormap, path, notes)
    elif photometric == 5:
        x, bits = _cmyk_to_rgb(arr, path, notes, bits, icc)
    else:
        if photometric == 0:
            notes.append("min-is-white photometric inverted")
        x, bits = _scale(arr, path, notes, bits if arr.dtype.kind == "u" else None, invert=photometric == 0)
    return DecodedImage(_layout(x, path, notes), path, "TIFF", bits, mode, notes)


def _tiff_palette(idx: np.ndarray, colormap, path, notes: list) -> tuple[np.ndarray, int]:
    if colormap is None:
        raise ImageReadError(path, "palette TIFF without a colour map")
    cmap = np.asarray(colormap)
    if cmap.ndim != 2 or cmap.shape[0] != 3:
        raise ImageReadError(path, f"palette TIFF with a colour map of shape {cmap.shape} (needs 3 x N)")
    if idx.size and int(idx.max()) >= cmap.shape[1]:
        raise ImageReadError(path, f"palette index {int(idx.max())} outside the colour map of {cmap.shape[1]} "
                                   f"entries")
    top = int(cmap.max()) if cmap.size else 0
    if 0 < top <= 255:
        raise ImageReadError(path, f"TIFF colour map holds only values 0..{top}; TIFF colour maps are 16-bit "
                                   f"(0..65535), so read as declared the image would be black")
    notes.append("palette image converted to RGB (16-bit TIFF colour map, divided by 65535)")
    rgb = cmap.T[idx].astype(np.float64) / 65535.0
    return rgb.astype(np.float32), int(np.iinfo(idx.dtype).bits) if idx.dtype.kind == "u" else 8


def _read_tiff_pillow(path: Path, notes: list, pname: str, photometric: int, bits: int, sampleformat: int,
                      compression: str, codec_error: str, icc: bool) -> DecodedImage:
    """A TIFF whose compression tifffile cannot decode here (no ``imagecodecs``): Pillow (libtiff) decodes it when
    its mode keeps the declared samples; anything else is refused with the reason."""
    refuse = (f"{compression}-compressed {bits}-bit {pname} TIFF cannot be decoded exactly here: tifffile needs the "
              f"'imagecodecs' package for it (pip install imagecodecs)")
    try:
        im = _pil_open(path, b"")
    except ImageReadError as e:
        raise ImageReadError(path, f"{refuse}, and Pillow cannot open it ({e.reason})") from None
    with im:
        try:
            im.seek(0)
            im.load()
        except Exception as e:
            raise ImageReadError(path, f"{refuse}, and Pillow cannot decode it ({type(e).__name__}: {e})") from None
        mode = im.mode
        ok = ((mode == "1" and bits == 1)
              or (mode in ("L", "LA", "RGB", "RGBA", "P", "PA", "CMYK") and bits == 8 and sampleformat == 1)
              or (mode.startswith("I;16") and bits == 16 and sampleformat == 1)
              or (mode == "I" and bits == 32 and sampleformat == 1)
              or (mode == "F" and bits == 32 and sampleformat == 3))
        if not ok:
            raise ImageReadError(path, f"{refuse} (Pillow would decode it as mode {mode})")
        if photometric == 6:
            notes.append("YCbCr (JPEG-compressed) converted to RGB by the JPEG codec")
        if mode == "I":
            arr = np.asarray(im).view(np.uint32)
            x, bits = _scale(arr, path, notes, 32)
        else:
            x, bits = _pil_samples(im, path, notes, icc)
    return DecodedImage(_layout(x, path, notes), path, "TIFF", bits, mode, notes)


# ---------------------------------------------------------------------------------------------------------------------
# PNG, JPEG, WebP, BMP, GIF (Pillow; 16-bit PNG through OpenCV)
# ---------------------------------------------------------------------------------------------------------------------

def _png_header(path: Path) -> tuple[int, int]:
    """``(bit depth, colour type)`` from the IHDR chunk (``(8, -1)`` when it cannot be read)."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) >= 26 and head[:8] == b"\x89PNG\r\n\x1a\n":
        return head[24], head[25]
    return 8, -1


def _read_png16(path: Path, color_type: int) -> tuple[np.ndarray, str]:
    """A 16-bit PNG as uint16 ``[H, W(, C)]`` in the stored layout, and its mode (``L``, ``LA``, ``RGB``, ``RGBA``)."""
    import cv2
    buf = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "truncated or corrupt 16-bit PNG data")
    if arr.dtype != np.uint16:
        raise ImageReadError(path, f"16-bit PNG decoded as {arr.dtype} by OpenCV")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [0, 3]] if color_type == 4 else arr[..., [2, 1, 0, 3]]   # gray+alpha comes back as BGRA
    mode = {2: "L"}.get(arr.ndim) or {2: "LA", 3: "RGB", 4: "RGBA"}.get(arr.shape[2], "?")
    return arr, mode


def _pil_open(path: Path, magic: bytes):
    from PIL import Image, UnidentifiedImageError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None   # our own limit is checked from the header right after opening
            return Image.open(path)
        except UnidentifiedImageError:
            raise ImageReadError(path, f"not a recognised image file (PNG, JPEG, WebP, TIFF, BMP or GIF); it starts "
                                       f"with {magic!r}") from None
        except Image.DecompressionBombError as e:
            raise ImageReadError(path, f"image is too large ({e})") from None
        except Exception as e:
            raise ImageReadError(path, f"cannot open image ({type(e).__name__}: {e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def read_image(path: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               exif_orientation: bool = False) -> DecodedImage:
    """Decodes one file to a ``[3, H, W]`` float32 RGB tensor in [0, 1] (see the module docstring).

    Arguments:
        path: the file (PNG, JPEG, WebP, BMP, GIF, TIFF; the content decides, not the extension).
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
        if e.errno == errno.ELOOP:
            raise ImageReadError(path, "symlink loop") from None
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

    from PIL import Image, ImageOps
    notes: list = []
    im = _pil_open(path, magic)
    with im:
        fmt = im.format or "?"
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageReadError(path, f"image header declares an empty size {w}x{h}")
        _too_many(path, h, w, max_pixels)
        mode = im.mode
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        if n_frames > 1:
            kind = "multi-picture" if fmt == "MPO" else "animated"
            notes.append(f"first of {n_frames} frames used ({kind} {fmt})")
        png_bits, color_type = _png_header(path) if fmt == "PNG" else (8, -1)
        try:
            if fmt == "PNG" and png_bits == 16 and not mode.startswith("I"):
                arr, mode = _read_png16(path, color_type)
                x, bits = _scale(arr, path, notes, 16)
            else:
                im.seek(0)
                im.load()
                if exif_orientation:
                    im = ImageOps.exif_transpose(im)
                    notes.append("EXIF orientation applied")
                if im.mode == "I":
                    if not (fmt == "PNG" and png_bits == 16):
                        raise ImageReadError(path, f"32-bit integer {fmt} samples with no declared range are not "
                                                   f"supported")
                    arr = np.asarray(im)
                    x, bits = _scale(arr.astype(np.uint16) if arr.size and arr.min() >= 0 and arr.max() <= 65535
                                     else arr, path, notes, 16)
                else:
                    x, bits = _pil_samples(im, path, notes, bool(im.info.get("icc_profile")))
        except ImageReadError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageReadError(path, f"image is too large ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            msg = str(e) or type(e).__name__
            raise ImageReadError(path, f"truncated or corrupt {fmt} data ({msg})") from None
    if exif_orientation and fmt == "PNG" and "EXIF orientation applied" not in notes:
        notes.append("EXIF orientation not applied to 16-bit PNG")
    image = _layout(x, path, notes)
    if image.shape[1] != h or image.shape[2] != w:  # EXIF rotation swaps sizes; anything else is a decoder bug
        if not exif_orientation:
            raise ImageReadError(path, f"decoded size {image.shape[2]}x{image.shape[1]} differs from the header "
                                       f"{w}x{h}")
    return DecodedImage(image, path, fmt, bits, mode, notes)


def _pil_samples(im, path, notes: list, icc: bool) -> tuple[np.ndarray, int]:
    """A loaded Pillow image (any mode but ``I``) -> float samples in [0, 1] ``[H, W(, C)]`` and the declared bits."""
    mode = im.mode
    if mode == "P":
        has_alpha = "transparency" in im.info
        notes.append("palette image converted to RGB" + (" (palette transparency kept as alpha)" if has_alpha else ""))
        return _scale(np.asarray(im.convert("RGBA" if has_alpha else "RGB")), path, notes)
    if mode == "PA":
        notes.append("palette image converted to RGB (palette with alpha)")
        return _scale(np.asarray(im.convert("RGBA")), path, notes)
    if mode in ("1", "L", "LA", "RGB", "RGBA"):
        return _scale(np.asarray(im), path, notes)
    if mode in ("RGBX", "RGBa", "La"):
        notes.append(f"converted from {mode} to RGB" + (" (premultiplied alpha undone)" if mode != "RGBX" else ""))
        return _scale(np.asarray(im.convert("RGBA" if mode != "RGBX" else "RGB")), path, notes)
    if mode.startswith("I;16"):
        if mode.endswith("S"):
            raise ImageReadError(path, "signed 16-bit integer samples are not supported")
        return _scale(np.asarray(im).astype(np.uint16), path, notes, 16)
    if mode == "F":
        return _scale(np.asarray(im, dtype=np.float32), path, notes)
    if mode == "CMYK":
        return _cmyk_to_rgb(np.asarray(im), path, notes, 8, icc)
    if mode in ("YCbCr", "LAB", "HSV"):
        raise ImageReadError(path, f"{mode} pixel data is not supported; convert the image to RGB")
    raise ImageReadError(path, f"unsupported pixel mode {mode}")
