"""Aspect-ratio buckets (as kohya-ss does): train on non-square images without squashing them.

Buckets are (width, height) pairs with sides multiples of ``step`` and an area of at most
``resolution``². Each image goes to the bucket with the closest aspect ratio and is resized to
cover it; the overflow (less than one ``step``) is cut evenly from both sides. Without upscaling
(the paper's ``bucket_no_upscale``), a small image gets a bucket of its own size rounded down.
"""

from __future__ import annotations

import math

from PIL import Image


def make_buckets(
    resolution: int = 512, step: int = 64, min_side: int = 256, max_side: int = 1024
) -> list[tuple[int, int]]:
    """All (width, height) buckets of area <= resolution², sides multiples of ``step``."""
    max_area = resolution * resolution
    min_side = max(step, min_side - min_side % step)
    buckets = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_bucket(
    size: tuple[int, int],
    buckets: list[tuple[int, int]],
    *,
    step: int = 64,
    upscale: bool = False,
) -> tuple[int, int]:
    """The bucket for an image of ``size`` = (width, height)."""
    width, height = size
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if not upscale and width * height < best[0] * best[1]:
        # Too small for its bucket: a bucket of its own size, each side rounded down to a step.
        return max(step, width // step * step), max(step, height // step * step)
    return best


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize ``img`` to cover ``bucket`` (keeping its aspect) and crop the overflow evenly."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    size = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    resized = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    return resized.crop((left, top, left + bw, top + bh))


def center_square(img: Image.Image, resolution: int) -> Image.Image:
    """The centre-crop option: a ``resolution`` square cut from the middle."""
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)
