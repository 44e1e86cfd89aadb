"""Aspect-ratio buckets, the way kohya-ss sd-scripts makes them.

Two modes, as in kohya's ``BucketManager`` (``library/train_util.py``):

* **no upscale** (``bucket_no_upscale``, the paper's setting): every image gets a bucket of its
  own. An image larger than ``resolution``² is shrunk, keeping its aspect ratio, to an area of
  ``resolution``²; of the two ways to round that size to ``step`` multiples (round the width
  first, or the height first) the one whose aspect ratio is closer to the image's wins. The
  bucket is the (resized) size rounded down to multiples of ``step``; the overflow, less than
  one step, is cut evenly from both sides. Images are never enlarged.
* **upscale** (kohya's default): a fixed list of buckets with an area of at most
  ``resolution``² and sides between ``min_side`` and ``max_side``; each image goes to the bucket
  whose width/height ratio is nearest to its own and is resized (up or down) so that it covers
  the bucket, then trimmed to it.

``tests/lora/test_parity.py`` checks both against answers recorded from kohya's own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from fulora.lora.resize import area_resize


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket and the size it is resized to before trimming."""

    bucket: tuple[int, int]  # (width, height), multiples of the bucket step
    resized: tuple[int, int]  # (width, height) after resizing; covers the bucket


def make_buckets(
    resolution: int = 512, step: int = 64, min_side: int = 256, max_side: int = 1024
) -> list[tuple[int, int]]:
    """The fixed (width, height) buckets of the upscale mode, sorted.

    The square bucket of side ``resolution`` rounded down to ``step``, plus every pair with
    sides multiples of ``step`` between ``min_side`` and ``max_side`` whose height is the
    largest that keeps the area at most ``resolution``² (and its transpose).
    """
    max_area = resolution * resolution
    square = int(math.sqrt(max_area) // step) * step
    buckets = {(square, square)}
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def _round_down_half_up(value: float, step: int) -> int:
    """Round to the nearest integer, then down to a multiple of ``step`` (kohya's rule)."""
    whole = int(value + 0.5)
    return whole - whole % step


def _no_upscale_size(width: int, height: int, max_area: int, step: int) -> tuple[int, int]:
    """The resized size of an image in the no-upscale mode."""
    if width * height <= max_area:
        return width, height
    ratio = width / height
    target_w = math.sqrt(max_area * ratio)
    target_h = max_area / target_w
    # Round the width to a step and derive the height, or the other way round; keep the
    # rounding whose aspect ratio stays closer to the image's.
    by_width = _round_down_half_up(target_w, step)
    by_height = _round_down_half_up(target_h, step)
    height_of_width = _round_down_half_up(by_width / ratio, step)
    if 0 in (by_width, by_height, height_of_width):  # kohya's own code divides by zero here
        raise ValueError(
            f"a {width}x{height} image shrunk to the bucket area ({target_w:.0f}x{target_h:.0f} "
            f"px) has a side under half a bucket step ({step} px)"
        )
    by_width_ratio = by_width / height_of_width
    by_height_ratio = _round_down_half_up(by_height * ratio, step) / by_height
    if abs(by_width_ratio - ratio) < abs(by_height_ratio - ratio):
        return by_width, int(by_width / ratio + 0.5)
    return int(by_height * ratio + 0.5), by_height


def select_bucket(
    size: tuple[int, int],
    *,
    resolution: int = 512,
    step: int = 64,
    upscale: bool = False,
    buckets: list[tuple[int, int]] | None = None,
) -> BucketChoice:
    """The bucket of an image of ``size`` = (width, height), as kohya-ss chooses it.

    Args:
        size: The image's (width, height).
        resolution: The bucket area is at most ``resolution``².
        step: Bucket sides are multiples of ``step``.
        upscale: False for kohya's ``bucket_no_upscale`` (a bucket per image, never enlarged);
            True for the fixed list of ``buckets``.
        buckets: The fixed buckets of the upscale mode (default: :func:`make_buckets`).

    Returns:
        The bucket and the size to resize the image to before trimming it to the bucket.

    Raises:
        ValueError: If the image, or its shrunk size, is smaller than one ``step`` in the
            no-upscale mode.
    """
    width, height = size
    ratio = width / height
    if not upscale:
        resized = _no_upscale_size(width, height, resolution * resolution, step)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(bucket) < step:
            raise ValueError(
                f"a {width}x{height} image is smaller than one bucket step ({step} px)"
            )
        return BucketChoice(bucket, resized)
    choices = buckets or make_buckets(resolution, step)
    if (width, height) in choices:
        bucket = (width, height)
    else:  # nearest width/height ratio; the first in sorted order on a tie
        bucket = min(choices, key=lambda b: abs(b[0] / b[1] - ratio))
    scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketChoice(bucket, resized)


def fit_to_bucket(img: Image.Image, choice: BucketChoice, resize: str = "area") -> Image.Image:
    """Resize ``img`` to ``choice.resized`` and trim the overflow evenly to the bucket.

    Shrinking uses OpenCV's INTER_AREA (``resize="area"``, kohya's default,
    :func:`fulora.lora.resize.area_resize`) or PIL's BOX filter (``"box"``, fulora's until
    session 25, kohya's ``--resize_interpolation box``); enlarging uses Lanczos, as kohya does.
    """
    bw, bh = choice.bucket
    rw, rh = max(bw, choice.resized[0]), max(bh, choice.resized[1])
    if (rw, rh) != img.size:
        if rw > img.width or rh > img.height:
            img = img.resize((rw, rh), Image.Resampling.LANCZOS)
        elif resize == "area":
            img = area_resize(img, (rw, rh))
        else:
            img = img.resize((rw, rh), Image.Resampling.BOX)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def center_square(img: Image.Image, resolution: int) -> Image.Image:
    """The centre-crop option: a ``resolution`` square cut from the middle."""
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)
