"""Every encoding a user meets is read by its declared photometric interpretation and bit depth, exactly, with the
conversion named in the notes, or refused with the file and the reason (hardening issue, class 6)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from robustness_diag.data.images import ImageReadError, read_image


def _refused(path, *words):
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in e.value.reason, (w, e.value.reason)
    return e.value.reason


def _px(d, y=0, x=0):
    return [float(v) for v in d.image[:, y, x]]


def _png16(path, arr, color_type):
    """A 16-bit PNG written by hand (gray 0, RGB 2, gray+alpha 4, RGBA 6)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------------
# 1-bit and 8-bit modes
# ---------------------------------------------------------------------------------------------------------------------

def test_1bit_png_and_tiff(tmp_path):
    a = np.array([[True, False], [False, True]])
    Image.fromarray(a).save(tmp_path / "b.png")
    d = read_image(tmp_path / "b.png")
    assert d.bit_depth == 1 and "1-bit" in d.notes and d.image.shape == (3, 2, 2)
    assert torch.equal(d.image[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tifffile.imwrite(tmp_path / "b.tif", a, photometric="minisblack")
    d = read_image(tmp_path / "b.tif")
    assert d.bit_depth == 1 and "1-bit" in d.notes and torch.equal(d.image[1], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tifffile.imwrite(tmp_path / "w.tif", a, photometric="miniswhite")      # 1 = black
    d = read_image(tmp_path / "w.tif")
    assert "min-is-white photometric inverted" in d.notes
    assert torch.equal(d.image[2], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_8bit_gray_rgb_rgba_la(tmp_path):
    g = np.array([[0, 128], [255, 7]], np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    d = read_image(tmp_path / "g.png")
    assert d.bit_depth == 8 and "grayscale repeated to RGB" in d.notes
    assert _px(d, 0, 1) == pytest.approx([128 / 255] * 3, rel=1e-6)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = [[0, 255], [128, 1]]
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    d = read_image(tmp_path / "rgba.png")
    assert "alpha channel dropped (RGBA)" in d.notes and _px(d) == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    la = np.stack([g, np.full_like(g, 9)], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    d = read_image(tmp_path / "la.png")
    assert {"alpha channel dropped (LA)", "grayscale repeated to RGB"} <= set(d.notes)
    assert _px(d, 1, 0) == [1.0, 1.0, 1.0]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    d = read_image(tmp_path / "p.png")
    assert d.source_mode == "P" and "palette image converted to RGB" in d.notes
    assert _px(d, 0, 0) == [1.0, 0.0, 0.0] and _px(d, 0, 1) == [0.0, 0.0, 1.0]
    p.info["transparency"] = 1
    p.save(tmp_path / "pt.png", transparency=1)
    d = read_image(tmp_path / "pt.png")
    assert any("palette transparency kept as alpha" in n for n in d.notes)
    assert any("alpha channel dropped" in n for n in d.notes) and _px(d, 0, 1) == [0.0, 0.0, 1.0]
    p.save(tmp_path / "p.gif")                                          # GIF: palette too (named files are read)
    d = read_image(tmp_path / "p.gif")
    assert d.format == "GIF" and _px(d, 0, 0) == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# 16 and 32 bits, float
# ---------------------------------------------------------------------------------------------------------------------

def test_16bit_png_gray_rgb_rgba_la_full_range(tmp_path):
    cases = {"g": (np.array([[65535, 0]], np.uint16), 0), "rgb": (np.array([[[65535, 0, 257]] * 2], np.uint16), 2),
             "la": (np.array([[[65535, 3], [1, 65535]]], np.uint16), 4),
             "rgba": (np.array([[[65535, 1, 0, 5]] * 2], np.uint16), 6)}
    for name, (arr, ct) in cases.items():
        _png16(tmp_path / f"{name}.png", arr, ct)
        d = read_image(tmp_path / f"{name}.png")
        assert d.bit_depth == 16 and "16-bit" in d.notes, name
        assert _px(d, 0, 0)[0] == 1.0, name                                       # 65535 -> exactly 1.0
    assert _px(read_image(tmp_path / "rgb.png"), 0, 0) == [1.0, 0.0, np.float32(257) / np.float32(65535)]
    d = read_image(tmp_path / "la.png")
    assert d.source_mode == "LA" and "alpha channel dropped (LA)" in d.notes
    assert _px(d, 0, 1) == pytest.approx([1 / 65535] * 3, rel=1e-6)
    assert "alpha channel dropped (RGBA)" in read_image(tmp_path / "rgba.png").notes


def test_16bit_tiff_gray_rgb_and_planar(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", np.array([[65535, 1]], np.uint16))
    d = read_image(tmp_path / "g.tif")
    assert d.bit_depth == 16 and _px(d, 0, 0) == [1.0] * 3 and _px(d, 0, 1) == pytest.approx([1 / 65535] * 3)
    rgb = np.zeros((3, 2, 2), np.uint16)
    rgb[0], rgb[1], rgb[2] = 65535, 32768, 1
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    d = read_image(tmp_path / "planar.tif")
    assert d.source_mode == "RGB" and _px(d) == pytest.approx([1.0, 32768 / 65535, 1 / 65535], rel=1e-6)


def test_32bit_integer_tiff_by_declared_range_or_refused(tmp_path):
    tifffile.imwrite(tmp_path / "u32_255.tif", np.full((2, 2), 255, np.uint32))
    _refused(tmp_path / "u32_255.tif", "32-bit", "largest value is 255")       # not read as 255/65535
    a = np.array([[4294967295, 2147483648]], np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", a)
    d = read_image(tmp_path / "u32.tif")
    assert d.bit_depth == 32 and any("32-bit integer (divided by 4294967295)" in n for n in d.notes)
    assert _px(d, 0, 0) == [1.0] * 3 and _px(d, 0, 1) == pytest.approx([0.5] * 3)
    tifffile.imwrite(tmp_path / "i32.tif", np.full((2, 2), 255, np.int32))
    _refused(tmp_path / "i32.tif", "signed integer")
    tifffile.imwrite(tmp_path / "i16.tif", np.full((2, 2), 255, np.int16))
    _refused(tmp_path / "i16.tif", "signed integer")


def test_float_tiff_in_range_accepted_out_of_range_refused(tmp_path):
    f = np.array([[[0.0, 0.25, 1.0]] * 2], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="rgb")
    d = read_image(tmp_path / "f.tif")
    assert d.bit_depth == 32 and any("32-bit float" in n for n in d.notes) and _px(d) == [0.0, 0.25, 1.0]
    tifffile.imwrite(tmp_path / "over.tif", f * 255, photometric="rgb")
    _refused(tmp_path / "over.tif", "outside [0, 1]", "255")
    tifffile.imwrite(tmp_path / "neg.tif", f - 0.5, photometric="rgb")
    _refused(tmp_path / "neg.tif", "outside [0, 1]")
    tifffile.imwrite(tmp_path / "nan.tif", np.full((2, 2), np.nan, np.float32))
    _refused(tmp_path / "nan.tif", "NaN or Inf")
    tifffile.imwrite(tmp_path / "f64.tif", np.full((2, 2), 0.5, np.float64))
    assert any("64-bit float" in n for n in read_image(tmp_path / "f64.tif").notes)


# ---------------------------------------------------------------------------------------------------------------------
# other photometric interpretations
# ---------------------------------------------------------------------------------------------------------------------

def test_cmyk_tiff_and_jpeg_converted_not_read_as_rgba(tmp_path):
    cmyk = np.array([[[0, 255, 0, 0], [51, 0, 0, 51]]], np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", cmyk, photometric="separated")
    d = read_image(tmp_path / "c.tif")
    assert d.source_mode == "CMYK" and not any("alpha" in n for n in d.notes)
    assert any("CMYK converted to RGB" in n for n in d.notes)
    assert _px(d, 0, 0) == [1.0, 0.0, 1.0]                                      # magenta ink -> (1, 0, 1)
    assert _px(d, 0, 1) == pytest.approx([0.8 * 0.8, 0.8, 0.8])                  # (1-C)(1-K) = 0.64
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
    d = read_image(tmp_path / "c.jpg")
    assert d.format == "JPEG" and any("CMYK converted to RGB" in n for n in d.notes)
    assert _px(d, 0, 0) == pytest.approx([1.0, 0.0, 1.0], abs=0.03)


def test_ycbcr_and_lab_tiff_refused_with_reason(tmp_path):
    tifffile.imwrite(tmp_path / "y.tif", np.full((2, 2, 3), 100, np.uint8), photometric="ycbcr", subsampling=(1, 1))
    _refused(tmp_path / "y.tif", "YCbCr")
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 2, 3), 100, np.uint8), photometric="cielab")
    _refused(tmp_path / "lab.tif", "CIELAB")
    Image.new("LAB", (2, 2), (50, 0, 0)).save(tmp_path / "plab.tif")
    _refused(tmp_path / "plab.tif", "CIELAB")


def test_tiff_palette_extra_samples_and_min_is_white(tmp_path):
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = [65535, 0, 32768]
    tifffile.imwrite(tmp_path / "p.tif", np.array([[0, 1]], np.uint8), photometric="palette", colormap=cmap)
    d = read_image(tmp_path / "p.tif")
    assert any("palette image converted to RGB" in n for n in d.notes)
    assert _px(d, 0, 1) == pytest.approx([1.0, 0.0, 32768 / 65535])
    tifffile.imwrite(tmp_path / "x.tif", np.full((2, 2, 4), 51, np.uint8), photometric="rgb", extrasamples=[0])
    d = read_image(tmp_path / "x.tif")
    assert any("extra sample" in n for n in d.notes) and not any("alpha channel dropped" in n for n in d.notes)
    tifffile.imwrite(tmp_path / "mw.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite")
    d = read_image(tmp_path / "mw.tif")
    assert "min-is-white photometric inverted" in d.notes and _px(d, 0, 0) == [1.0] * 3 and _px(d, 0, 1) == [0.0] * 3


def test_lzw_tiff_without_imagecodecs_decoded_exactly_or_refused(tmp_path):
    Image.fromarray(np.array([[[3, 4, 5], [250, 0, 128]]], np.uint8)).save(tmp_path / "lzw.tif",
                                                                           compression="tiff_lzw")
    d = read_image(tmp_path / "lzw.tif")
    assert d.format == "TIFF" and _px(d, 0, 1) == pytest.approx([250 / 255, 0.0, 128 / 255])
    Image.fromarray(np.array([[1000, 65535]], np.uint16)).save(tmp_path / "lzw16.tif", compression="tiff_lzw")
    d = read_image(tmp_path / "lzw16.tif")                 # gray 16-bit: Pillow keeps the 16 bits
    assert d.bit_depth == 16 and _px(d, 0, 1) == [1.0] * 3


# ---------------------------------------------------------------------------------------------------------------------
# multi-frame: the first frame, said in the notes
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["png", "gif", "webp"])
def test_animated_first_frame_with_note(tmp_path, ext):
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255)),
              Image.new("RGB", (4, 4), (0, 255, 0))]
    kw = {"lossless": True} if ext == "webp" else {}
    frames[0].save(tmp_path / f"a.{ext}", save_all=True, append_images=frames[1:], duration=100, **kw)
    d = read_image(tmp_path / f"a.{ext}")
    assert any(n.startswith("first of 3 frames used (animated") for n in d.notes), d.notes
    assert _px(d) == pytest.approx([1.0, 0.0, 0.0], abs=0.01)


def test_multipage_tiff_first_page_with_note(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.stack([np.full((2, 2), v, np.uint8) for v in (255, 0, 9)]),
                     photometric="minisblack")
    d = read_image(tmp_path / "m.tif")
    assert "first of 3 TIFF pages used" in d.notes and _px(d) == [1.0] * 3
