r"""What the folder commands (``fit``, ``score``, ``sample``) share about their inputs and outputs.

* :class:`InputOptions`: which image files, and how they become LR images;
* :func:`list_inputs` / :func:`decoder`: the files of :class:`InputOptions` and the decoder that reads one;
* :func:`to_lr`: a decoded image as the flow's LR input ``[1, 3, h, w]`` in [0, 1] (HR inputs downscaled by the
  flow's scale: bicubic with anti-aliasing, :func:`robustness_diag.data.photos.downscale`);
* :func:`config_record`: a command's configuration as recorded in ``run.json`` (callables left out);
* :func:`setup_errors`: the exception types that mean "usage or setup error" (exit code 2, nothing processed);
* :func:`flat_name` / :func:`name_key`: the output-file stem of an image key (``maps/<name>.*``,
  ``samples/<name>.*``) and back, shared by ``score``, ``sample`` and ``correlate`` (which pairs their maps by it).
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

    The list is an :class:`robustness_diag.data.images.ImageList`: its ``.scan`` accounts for every entry the
    listing saw (used, or skipped with the reason); :func:`robustness_diag.analyses.folder_run.run_folder` puts it in
    its summary and in run.json.

    Raises:
        ValueError: no image file matched (a setup error); the message says what was seen and why it was skipped.
        ImageListError: a folder or list file cannot be read.
    """
    from robustness_diag.data.images import list_images
    items = list_images(inp.images, include=inp.include, exclude=inp.exclude, recursive=inp.recursive)
    if not items:
        raise ValueError(f"no image files found in {', '.join(map(str, inp.images))} "
                         f"({items.scan.describe()})")
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
    """A command's dataclass configuration as a dict for ``run.json`` (the ``overlay_writer`` callable left out, and
    the ``engine`` when it is the local default, so a local run records what it always did)."""
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    d.pop("overlay_writer", None)
    if isinstance(d.get("engine"), dict) and d["engine"].get("kind", "local") == "local":
        d.pop("engine")
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


#: characters escaped in output names besides ``%`` itself: path separators, characters that Windows or shells
#: refuse or misread in file names, and ``~`` (it separates the digest)
_UNSAFE = set('/\\:*?"<>|~')
#: longest escaped key kept in a name (UTF-8 bytes); longer keys are cut and marked, the longer digest identifies them
MAX_NAME_BYTES = 150
_CUT = "%_"          # marks a cut name: "%" followed by a non-hex character never occurs in an escaped key


def _key_digest(key: str, n: int) -> str:
    import hashlib
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def flat_name(key: str) -> str:
    """The output-file stem of an image key: collision-free, reversible, the same on every platform.

    ``<escaped key>~<digest>``: the whole key, extension and folders included, percent-encoded (``%``, ``/``, ``\\``,
    ``:``, ``*``, ``?``, ``"``, ``<``, ``>``, ``|``, ``~``, control characters and a leading ``.``; bytes a key could
    not decode from the file system as their own ``%XX``), then ``~`` and the first 8 hex digits of the SHA-1 of the
    key (``"sub/a.png"`` -> ``"sub%2Fa.png~<8 hex>"``). Two different keys never share a stem: the escaped part is
    one-to-one, and the digest keeps stems that differ only in letter case (or Unicode normalisation) apart on file
    systems that do not tell those apart. A key whose escaped form is longer than :data:`MAX_NAME_BYTES` is cut there,
    marked with ``%_``, and gets a 16-digit digest (such names are not reversible; the identity recorded inside the
    files and the digest tell them apart). :func:`name_key` reverses a stem.
    """
    out = []
    for i, c in enumerate(key):
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:                        # an undecodable file-system byte (surrogateescape)
            out.append(f"%{o - 0xDC00:02X}")
        elif c == "%" or c in _UNSAFE or o < 0x20 or o == 0x7F or (i == 0 and c == "."):
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8")))
        else:
            out.append(c)
    escaped = "".join(out)
    if len(escaped.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        return f"{escaped}~{_key_digest(key, 8)}"
    cut, size = [], 0
    for piece in out:                                    # cut between escapes and whole characters only
        size += len(piece.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            break
        cut.append(piece)
    return f"{''.join(cut)}{_CUT}~{_key_digest(key, 16)}"


def name_key(name: str) -> Optional[str]:
    """The image key of an output stem written by :func:`flat_name` (a file name's part before its first
    ``.<suffix>`` after the digest is not needed: pass the stem). None when ``name`` is not such a stem, when it was
    cut (too long to reverse), or when its digest does not match the decoded key."""
    from urllib.parse import unquote
    escaped, sep, digest = name.rpartition("~")
    if not sep or len(digest) != 8 or _CUT in escaped:
        return None
    key = unquote(escaped, encoding="utf-8", errors="surrogateescape")
    return key if flat_name(key) == name else None


__all__ = ["DEFAULT_MIN_SIZE", "InputOptions", "list_inputs", "decoder", "setup_errors", "config_record", "to_lr",
           "flat_name", "name_key", "MAX_NAME_BYTES"]
