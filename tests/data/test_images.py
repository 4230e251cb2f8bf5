"""Decoding every supported format and depth, conversions said in notes, bad files named with reasons, listing."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from robustness_diag.data.images import ImageListError, ImageReadError, list_images, read_image
from tests.ood.helpers import smooth_rgb, write_png


@pytest.fixture
def rgb():
    return smooth_rgb(12, 17, seed=1)


@pytest.mark.parametrize("ext,fmt,tol", [("png", "PNG", 0.0), ("bmp", "BMP", 0.0), ("tif", "TIFF", 0.0),
                                         ("webp", "WEBP", 0.0), ("jpg", "JPEG", 0.05)])
def test_8bit_rgb_formats(tmp_path, rgb, ext, fmt, tol):
    a8 = (rgb * 255 + 0.5).astype(np.uint8)
    p = tmp_path / f"x.{ext}"
    if ext == "tif":
        import tifffile
        tifffile.imwrite(p, a8)
    elif ext == "webp":
        Image.fromarray(a8).save(p, lossless=True)
    elif ext == "jpg":
        Image.fromarray(a8).save(p, quality=98, subsampling=0)
    else:
        Image.fromarray(a8).save(p)
    d = read_image(p)
    assert d.format == fmt and d.bit_depth == 8 and d.image.dtype == torch.float32
    assert d.image.shape == (3, 12, 17) and d.notes == []
    err = (d.image - torch.from_numpy(a8).permute(2, 0, 1).float() / 255).abs().max()
    assert float(err) <= tol + 1e-7


def test_16bit_png_and_tiff_keep_full_precision(tmp_path, rgb):
    a16 = (rgb * 65535 + 0.5).astype(np.uint16)
    ref = torch.from_numpy(a16.astype(np.float32) / 65535).permute(2, 0, 1)
    write_png(tmp_path / "x16.png", rgb, bits=16)
    import tifffile
    tifffile.imwrite(tmp_path / "x16.tif", a16)
    for name in ("x16.png", "x16.tif"):
        d = read_image(tmp_path / name)
        assert d.bit_depth == 16 and "16-bit" in d.notes
        assert float((d.image - ref).abs().max()) < 1e-6, name      # not truncated to 8 bits


def test_gray_and_alpha_are_converted_and_said(tmp_path, rgb):
    g8 = (rgb[..., 0] * 255).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "g.jpg", quality=95)
    d = read_image(tmp_path / "g.jpg")
    assert d.image.shape == (3, 12, 17) and "grayscale repeated to RGB" in d.notes
    assert torch.equal(d.image[0], d.image[1]) and torch.equal(d.image[1], d.image[2])
    rgba = np.concatenate([(rgb * 255).astype(np.uint8), np.full((12, 17, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    d = read_image(tmp_path / "a.png")
    assert d.source_mode == "RGBA" and any("alpha channel dropped" in n for n in d.notes)
    assert torch.allclose(d.image, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)
    g16 = (rgb[..., 1] * 65535).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    d = read_image(tmp_path / "g16.png")
    assert d.bit_depth == 16 and "grayscale repeated to RGB" in d.notes
    assert float((d.image[0] - torch.from_numpy(g16.astype(np.float32) / 65535)).abs().max()) < 1e-6
    Image.fromarray((rgb * 255).astype(np.uint8)).convert("P").save(tmp_path / "p.png")
    assert "palette image converted to RGB" in read_image(tmp_path / "p.png").notes


def _png_header_only(path, w, h):
    """A PNG whose header declares w x h pixels, with a tiny (invalid) data chunk: a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
                     + chunk(b"IEND", b""))


def test_bad_files_raise_with_file_and_reason(tmp_path, rgb):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all\n")
    Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    cases = {"empty.png": "empty file (0 bytes)", "text.png": "not a recognised image file",
             "trunc.png": "truncated or corrupt PNG", "huge.png": "over the limit",
             "junk.tif": "TIFF", "missing.png": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        assert reason in e.value.reason, (name, e.value.reason)
        assert str(tmp_path / name) in str(e.value)
    with pytest.raises(ImageReadError, match="over the limit of 100"):
        read_image(tmp_path / "full.png", max_pixels=100)


def test_list_images_recursive_sorted_filtered_and_lists(tmp_path):
    for rel in ("b.png", "a.JPG", "sub/c.tif", "sub/deep/d.webp", "notes.txt.bak", "sub/e.bmp", "x.gif"):
        p = tmp_path / "root" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    keys = [it.key for it in list_images([tmp_path / "root"])]
    assert keys == ["a.JPG", "b.png", "sub/c.tif", "sub/deep/d.webp", "sub/e.bmp"]
    assert [it.key for it in list_images([tmp_path / "root"], recursive=False)] == ["a.JPG", "b.png"]
    assert [it.key for it in list_images([tmp_path / "root"], include=["*.png", "sub/*.tif"])] == \
        ["b.png", "sub/c.tif"]
    assert [it.key for it in list_images([tmp_path / "root"], exclude=["sub/*"])] == ["a.JPG", "b.png"]
    lst = tmp_path / "root" / "list.txt"
    lst.write_text("# inputs\nb.png\n\nsub/e.bmp\nmissing.png\n")
    items = list_images([lst])
    assert [it.key for it in items] == ["b.png", "missing.png", "sub/e.bmp"]   # missing kept: it will fail visibly
    both = list_images([tmp_path / "root", tmp_path / "root" / "b.png"])
    assert len(both) == 5                                                      # named twice, listed once
    with pytest.raises(ImageListError, match="no such file or folder"):
        list_images([tmp_path / "nope"])
