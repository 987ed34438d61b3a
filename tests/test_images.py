"""load_image: every mode, EXIF orientation, 16-bit, resizing, and each kind of bad input."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from keras_ham.images import ImageError, load_image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, pixels)
    np.testing.assert_array_equal(load_image(str(path)), pixels)  # str paths too
    np.testing.assert_array_equal(load_image(io.BytesIO(path.read_bytes())), pixels)  # file objects too


def test_rgba_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (10, 20, 30, 0)  # transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white -> mid grey
    out = load_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert out.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_palette_images_use_their_palette_and_transparency():
    palette = Image.new("P", (3, 2), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    out = load_image(_encode(palette, "PNG"))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)
    palette.info["transparency"] = 0
    out = load_image(_encode(palette, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (200, 100, 50)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.shape == (8, 8, 3)
    red, green, blue = (int(v) for v in out[4, 4])
    assert red > 240 and green < 15 and blue < 15


def test_16_bit_png_is_scaled_to_8_bit():
    deep = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    data = _encode(Image.fromarray(deep), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = load_image(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])  # not clipped at 255 or wrapped


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(image, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)  # portrait now
    top, bottom = out[5, 10].astype(int), out[-5, 10].astype(int)
    assert top[0] > 200 and top[2] < 50  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_resize_to_square_and_to_width_height():
    pixels = np.zeros((45, 60, 3), dtype=np.uint8)
    pixels[:, 30:] = 200
    data = _encode(Image.fromarray(pixels), "PNG")
    square = load_image(data, 16)
    assert square.shape == (16, 16, 3)
    assert square[:, :7].max() == 0 and square[:, 9:].min() == 200  # squashed, not cropped
    assert load_image(data, (30, 20)).shape == (20, 30, 3)  # (width, height)
    assert load_image(data, (60, 45)).shape == (45, 60, 3)


def test_empty_input_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: the file is empty"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"upload\.jpg: the file is empty"):
        load_image(b"", name="upload.jpg")


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ImageError, match=r"nowhere\.jpg: no such image file"):
        load_image(tmp_path / "nowhere.jpg")


def test_non_image_bytes_are_an_error(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_bytes(b"lesion_id,image_id\nHAM_1,ISIC_1\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(text)
    with pytest.raises(ImageError, match=r"<uploaded bytes>: not an image"):
        load_image(b"\x00\x01garbage")


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(cut)


def test_too_many_pixels_are_refused_before_decoding():
    data = _encode(Image.new("RGB", (100, 80)), "PNG")
    with pytest.raises(ImageError, match="100x80 = 8,000 pixels exceeds the limit of 5,000"):
        load_image(data, max_pixels=5000, name="big.png")
    assert load_image(data, max_pixels=8000).shape == (80, 100, 3)
    # headers claiming more pixels than Pillow's own bomb limits (warning, then error level)
    for side in (10_000, 20_000):
        with pytest.raises(ImageError, match="bomb.png: too many pixels|bomb.png: .* exceeds the limit"):
            load_image(_png_header_only(side, side), name="bomb.png")


def test_concurrent_decoding_leaves_warning_filters_untouched():
    """The dataset cache decodes on a thread pool; catch_warnings is process-global state."""
    data = _encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: load_image(data, 8), range(400)))
    assert all(result.shape == (8, 8, 3) for result in results)
    assert warnings.filters == before


def test_jpeg_cut_inside_its_header_is_a_clear_error(tmp_path):
    from keras_ham.images import ImageError, load_image

    path = tmp_path / "cut.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        load_image(path)
