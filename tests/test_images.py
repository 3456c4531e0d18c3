"""Image discovery and decoding: every mode becomes upright 8-bit RGB, bad files are reported."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from symbol_trainer import errors, images


def test_find_images_is_recursive_case_insensitive_and_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "ep1" / "deeper").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for name in ["a.jpg", "ep1/b.JPEG", "ep1/deeper/c.Png", "d.bmp", "e.gif", "f.webp",
                 "g.tif", "h.TIFF", ".hidden.jpg", ".cache/i.jpg", "notes.txt", "j.jpg.txt",
                 "Thumbs.db"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in images.find_images(tmp_path)]
    assert found == ["a.jpg", "d.bmp", "e.gif", "f.webp", "g.tif", "h.TIFF",
                     "ep1/b.JPEG", "ep1/deeper/c.Png"]


def test_find_images_names_a_missing_directory(tmp_path):
    with pytest.raises(errors.InputError, match="nope: no such directory"):
        images.find_images(tmp_path / "nope")


def _decoded(image: Image.Image, fmt: str, **save) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return np.asarray(images.read_image(buffer.getvalue()))


@pytest.mark.parametrize("mode, fmt, value, expected", [
    ("L", "PNG", 77, (77, 77, 77)),
    ("1", "PNG", 1, (255, 255, 255)),
    ("RGB", "BMP", (10, 20, 30), (10, 20, 30)),
    ("RGB", "TIFF", (10, 20, 30), (10, 20, 30)),
    ("RGB", "WEBP", (200, 200, 200), (200, 200, 200)),
])
def test_plain_modes_decode_to_rgb(mode, fmt, value, expected):
    pixels = _decoded(Image.new(mode, (8, 6), value), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[3, 4]) == expected


def test_palette_image_and_gif_decode_to_their_colours():
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    for fmt in ("PNG", "GIF"):
        pixels = _decoded(palette, fmt)
        assert tuple(pixels[0, 0]) == (250, 10, 10) and tuple(pixels[0, 7]) == (0, 0, 0)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    pixels = _decoded(rgba, "PNG")
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[2, 2]) == (255, 255, 255)
    assert tuple(_decoded(Image.new("LA", (4, 4), (0, 0)), "PNG")[1, 1]) == (255, 255, 255)
    assert images.ALPHA_BACKGROUND == "white"


def _png16_gray(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG written by hand, so the test does not rely on Pillow's writer."""
    height, width = values.shape
    raw = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_sixteen_bit_png_is_scaled_not_clipped():
    data = _png16_gray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    pixels = np.asarray(images.read_image(data))
    assert pixels.shape == (1, 3, 3)
    assert list(pixels[0, :, 0]) == [0, 128, 255]


def test_cmyk_jpeg_decodes_to_rgb():
    pixels = _decoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    red, green, blue = (int(v) for v in pixels[8, 8])
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = _decoded(image, "JPEG", exif=exif, quality=95)
    assert upright.shape == (40, 20, 3)
    assert upright[2, 10].mean() > 200 and upright[-3, 10].mean() < 50  # left edge is now on top


def test_jpeg_is_decoded_at_reduced_scale_when_much_larger_than_needed():
    buffer = io.BytesIO()
    Image.new("RGB", (1280, 720), (90, 90, 90)).save(buffer, "JPEG")
    assert images.read_image(buffer.getvalue(), (160, 160)).size == (320, 180)
    geometry = images.ImageGeometry(64, 96)
    assert images.resize_to_geometry(images.read_image(buffer.getvalue(), (96, 64)), geometry).shape == (64, 96, 3)


def test_truncated_and_garbage_files_raise_image_read_error_naming_the_file(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage):
        with pytest.raises(errors.ImageReadError) as caught:
            images.read_image(path)
        assert caught.value.path == str(path) and str(path) in str(caught.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but holds one empty data chunk."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, message", [
    (50_000, "refused without decoding: Image size \\(2500000000 pixels\\)"),
    (10_000, "claims 10000x10000 pixels.*refused without decoding"),
])
def test_decompression_bomb_is_refused_without_decoding(tmp_path, side, message):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(side, side))
    assert bomb.stat().st_size < 100
    with pytest.raises(errors.ImageReadError, match=message):
        images.read_image(bomb)


def test_scan_reports_bad_files_and_keeps_going(tmp_path):
    Image.new("RGB", (20, 10), (5, 5, 5)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    scan = images.scan_images([tmp_path / "good.png", tmp_path / "bad.jpg", tmp_path / "gone.png"])
    assert scan.readable.tolist() == [True, False, False]
    assert scan.size[0] == (20, 10) and len(scan.sha1[0]) == 40
    assert [p for p, _ in scan.errors] == [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png")]
    assert "file not found" in scan.errors[1][1]


def _frame(width, height):
    """A grey frame with a white 6-pixel border, to see where the image lands."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:6, :] = pixels[-6:, :] = pixels[:, :6] = pixels[:, -6:] = 255
    return Image.fromarray(pixels)


def test_letterbox_keeps_the_aspect_ratio_on_black_bars():
    out = images.resize_to_geometry(_frame(160, 90), images.ImageGeometry(64, 64, "letterbox"))
    assert out.shape == (64, 64, 3)
    rows = np.flatnonzero(out.max(axis=(1, 2)) > 0)
    assert (rows[0], rows[-1]) == (14, 49)  # 36 rows of picture (64 * 9/16), centred
    assert out[:14].max() == 0 and out[50:].max() == 0
    wide = images.resize_to_geometry(_frame(160, 90), images.ImageGeometry(64, 96, "letterbox"))
    assert wide.shape == (64, 96, 3) and wide[:4].max() == 0  # 16:9 in 3:2: still wider
    tall = images.resize_to_geometry(_frame(90, 160), images.ImageGeometry(64, 96, "letterbox"))
    assert tall[:, :20].max() == 0 and tall[:, -20:].max() == 0  # portrait: bars at the sides


def test_crop_covers_and_squash_stretches():
    crop = images.resize_to_geometry(_frame(160, 90), images.ImageGeometry(64, 64, "crop"))
    assert crop.shape == (64, 64, 3)
    assert crop[32, 0].mean() < 200 and crop[0, 32].mean() > 200  # sides cut, top border kept
    squash = images.resize_to_geometry(_frame(160, 90), images.ImageGeometry(64, 64, "squash"))
    assert squash[32, 0].mean() > 200 and squash[0, 32].mean() > 200


@pytest.mark.parametrize("resize, sizes, expected", [
    ("letterbox", [(1280, 720)] * 5 + [(640, 480)] * 2, (224, 384)),  # 16:9 wins; 224*1.78=398 -> 384
    ("crop", [(720, 1280)] * 3, (384, 224)),                           # portrait frames
    ("letterbox", [(640, 480)] * 3, (224, 288)),                       # 4:3 -> 298.7 -> 288
    ("letterbox", [(500, 500)], (224, 224)),
    ("squash", [(1280, 720)], (224, 224)),
])
def test_input_geometry_follows_the_most_common_aspect_ratio(resize, sizes, expected):
    geometry = images.input_geometry(224, resize, sizes)
    assert (geometry.height, geometry.width, geometry.resize) == (*expected, resize)
