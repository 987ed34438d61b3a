"""Decode any image a user may hand us into the one array layout the model takes.

Every path that reads pixels (dataset, cache, predict, Grad-CAM, dashboard) goes through
`load_image`, so a JPEG decodes the same way during training and in the dashboard.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from keras_ham.errors import KerasHamError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

#: File types keras-ham reads as images: image ids in a dataset folder, `predict` on a folder,
#: the dashboard's upload dialog. Pillow decodes them all; content is checked when decoded.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

#: Refuse images above this many pixels (decompression bombs). A 6000x4000 photo is 24 MP;
#: 64 MP leaves room for any real dermatoscope while stopping bombs.
MAX_PIXELS = 64_000_000


#: `warnings.catch_warnings` swaps process-global state: decoding threads (the dataset cache
#: decodes on a thread pool) must not interleave it, or one thread restores another's filters.
_WARNING_FILTERS_LOCK = threading.Lock()


class ImageError(KerasHamError, ValueError):
    """An image could not be read; the message names the file and the reason."""


def _describe(source: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<uploaded bytes>"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.max() > 1.0 else 1.0
        image = Image.fromarray(np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(
    source: ImageSource,
    image_size: int | tuple[int, int] | None = None,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read an image file, path or bytes as a `(H, W, 3)` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images are
    converted. With `image_size`, the image is resized (bilinear, aspect ratio not kept,
    as HAM10000's 600x450 images are usually squashed to a square) to that size.
    Raises `ImageError` naming the file for empty, corrupt, non-image or oversized input.
    """
    label = _describe(source, name)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label}: the file is empty (0 bytes).")
        stream: BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such image file.")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: the file is empty (0 bytes).")
        stream = open(path, "rb")
    else:
        stream = source
    try:
        # only opening (header parsing) checks Pillow's bomb limit; decoding runs unlocked
        with _WARNING_FILTERS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream)
            except UnidentifiedImageError:
                raise ImageError(f"{label}: not an image Pillow can read (expected JPEG, PNG, TIFF, BMP...).") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageError(f"{label}: too many pixels (decompression bomb guard).") from None
            except (OSError, SyntaxError, ValueError) as error:  # e.g. a header cut short
                raise ImageError(f"{label}: corrupt or truncated image ({error}).") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{label}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}."
            )
        try:
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            if image_size is not None:
                size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            array = np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ImageError(f"{label}: corrupt or truncated image ({error}).") from None
    finally:
        if isinstance(source, (str, os.PathLike)):
            stream.close()
    if array.ndim != 3 or array.shape[2] != 3:  # pragma: no cover - _to_rgb guarantees this
        raise ImageError(f"{label}: decoded to shape {array.shape}, expected (H, W, 3).")
    return array
