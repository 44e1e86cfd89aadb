"""Load any image a user may have into a uint8 array, or fail naming the file.

Grayscale, RGB, RGBA, LA, palette (with or without transparency), 16-bit and 32-bit integer
PNGs, and JPEGs (EXIF orientation applied) all load. Transparent pixels are composited on black,
the background of an ultrasound frame. 16-bit images are scaled by the range of their type
(65535 -> 255), not by their content, so that two images of one machine stay comparable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fulora.errors import ImageLoadError

ColorMode = Literal["L", "RGB"]
Resize = Literal["stretch", "stretch-bilinear", "letterbox", "crop"]

# PIL raises these for truncated, corrupt or unsupported files.
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def _flatten(img: Image.Image) -> Image.Image:
    """Return an 8-bit L or RGB image, whatever the input mode."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 1.0 if arr.max() <= 1.0 else 255.0)
            scale = 255.0 if arr.max() <= 1.0 else 1.0
            return Image.fromarray((arr * scale).round().astype(np.uint8), "L")
        # "I" is how Pillow opens 16-bit PNGs; scale by the 16-bit range when values exceed 8 bits.
        arr = arr.astype(np.int64)
        if mode != "I" or arr.max() > 255:
            arr = arr // 257
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB" if mode != "LA" else "L")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, mode: ColorMode = "L", *, row: int | None = None) -> Image.Image:
    """Open and fully decode an image as 8-bit grayscale (``L``) or ``RGB``.

    Args:
        path: Image file.
        mode: Output mode.
        row: Manifest row, named in the error message.

    Raises:
        ImageLoadError: If the file is missing, truncated, corrupt or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file does not exist", row=row)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()  # decode now, so truncation is found here and not later
                img = ImageOps.exif_transpose(img) if img.format == "JPEG" else img
                img = _flatten(img)
    except _DECODE_ERRORS as err:
        reason = str(err) or type(err).__name__
        if isinstance(err, UnidentifiedImageError):
            reason = "not an image file fulora can decode"
        raise ImageLoadError(path, f"{reason}", row=row) from None
    return img.convert(mode) if img.mode != mode else img


def resize_image(
    img: Image.Image, size: tuple[int, int], method: Resize = "stretch"
) -> Image.Image:
    """Resize to ``size`` = (height, width).

    Args:
        img: The image.
        size: Target (height, width).
        method: ``stretch`` (to exactly the size, bicubic), ``stretch-bilinear`` (to exactly
            the size as the paper's notebook does: torchvision's ``Resize((224, 224))`` on a PIL
            image, which is PIL's bilinear resize), ``letterbox`` (keep the aspect ratio, pad
            with black) or ``crop`` (keep the aspect ratio, fill the size and cut the overflow
            at the centre).
    """
    height, width = size
    if method == "stretch":
        return img.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if method == "stretch-bilinear":  # no reducing_gap: pixel for pixel what torchvision gives
        return img.resize((width, height), Image.Resampling.BILINEAR)
    if method == "letterbox":
        scale = min(width / img.width, height / img.height)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        resized = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas = Image.new(img.mode, (width, height), 0)
        canvas.paste(resized, ((width - new[0]) // 2, (height - new[1]) // 2))
        return canvas
    if method == "crop":
        return ImageOps.fit(img, (width, height), Image.Resampling.BICUBIC)
    raise ValueError(
        f"unknown resize method {method!r}; use stretch, stretch-bilinear, letterbox or crop"
    )


def image_info(path: str | Path) -> tuple[tuple[int, int], str]:
    """((width, height), mode) read from the header only, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except _DECODE_ERRORS as err:
        raise ImageLoadError(path, str(err) or type(err).__name__) from None


def to_array(img: Image.Image) -> np.ndarray:
    """uint8 array, (H, W) for L, (H, W, 3) for RGB."""
    return np.array(img, dtype=np.uint8)  # a writable copy (PIL's buffer view is read-only)


def thumbnail(path: str | Path, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A grayscale thumbnail (height, width) of an image file, letterboxed (uint8 array)."""
    return np.asarray(resize_image(load_image(path), size, "letterbox"))
