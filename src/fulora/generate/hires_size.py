"""The size of AUTOMATIC1111's hires pass: its target, and what its upscalers resize to.

Torch-free, so that the A1111 text reader (``infotext``) and the config can size a pass;
``fulora.generate.hires`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A1111's latent scale: a latent pixel per 8 image pixels (its ``opt_f``)
LATENT_SCALE = 8


@dataclass(frozen=True)
class HiresTarget:
    """Where A1111's hires pass upscales the latent to, and the part of it kept (pixels).

    Attributes:
        resized: (width, height) an image upscaler resizes the decoded image to (A1111's
            ``hr_upscale_to_x`` and ``_y``, whole).
        box: (left, top, right, bottom) of it kept, multiples of 8 (A1111's ``truncate_x``
            and ``_y``: with "Hires resize" of another aspect ratio, the excess cut from both
            sides, the odd latent pixel from the right or bottom).
    """

    resized: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def upscaled(self) -> tuple[int, int]:
        """(width, height) the latent is resized to: ``resized`` cut down to multiples of 8.

        A1111's latent of ``hr_upscale_to_x`` and ``_y``: their integer eighth.
        """
        width, height = self.resized
        return width // LATENT_SCALE * LATENT_SCALE, height // LATENT_SCALE * LATENT_SCALE

    @property
    def size(self) -> tuple[int, int]:
        """The (width, height) of the images written."""
        left, top, right, bottom = self.box
        return right - left, bottom - top


def hires_target(
    width: int, height: int, scale: float | None = None, resize: tuple[int, int] = (0, 0)
) -> HiresTarget:
    """A1111's target for the hires pass (its ``calculate_target_resolution``).

    Args:
        width: The first pass's width.
        height: The first pass's height.
        scale: "Hires upscale": both sides times it (``int`` of each), when ``resize`` is
            (0, 0).
        resize: "Hires resize" (width, height); 0 for one side: the other's, at the first
            pass's aspect ratio. Both: the first pass's aspect ratio upscaled to cover them,
            then cut to them.
    """
    cut_x = cut_y = 0
    rx, ry = resize
    if rx == 0 and ry == 0:
        to_x, to_y = int(width * (scale or 1.0)), int(height * (scale or 1.0))
    elif ry == 0:
        to_x, to_y = rx, rx * height // width
    elif rx == 0:
        to_x, to_y = ry * width // height, ry
    else:
        if width / height < rx / ry:
            to_x, to_y = rx, rx * height // width
        else:
            to_x, to_y = ry * width // height, ry
        cut_x, cut_y = (to_x - rx) // LATENT_SCALE, (to_y - ry) // LATENT_SCALE
    latent_x, latent_y = to_x // LATENT_SCALE, to_y // LATENT_SCALE
    box = (cut_x // 2, cut_y // 2, latent_x - (cut_x + 1) // 2, latent_y - (cut_y + 1) // 2)
    return HiresTarget((to_x, to_y), tuple(side * LATENT_SCALE for side in box))


def upscaler_scale(
    width: int, height: int, target: tuple[int, int]
) -> tuple[float, tuple[int, int]]:
    """(scale, eighths) of A1111's ``Upscaler.upscale``, resizing (width, height) to ``target``.

    The scale is the larger of the two sides' ratios; the eighths, the image times it, each
    side cut down to a multiple of 8 (what the upscaler resizes to before the target).
    """
    scale = max(target[0] / width, target[1] / height)
    return scale, (int(width * scale // 8 * 8), int(height * scale // 8 * 8))


def covers_its_eighths(width: int, height: int, target: tuple[int, int]) -> bool:
    """Whether A1111's versions before v1.8 resize this pass's image otherwise than v1.8+.

    Where a first pass of (width, height) already covers what ``Upscaler.upscale`` scales it to
    for ``target`` (cut down to a multiple of 8), those versions resized it by the scale all
    the same, and v1.8+ does not (``hires.upscale_image``).
    """
    scale, eighths = upscaler_scale(width, height, target)
    return scale > 1.0 and width >= eighths[0] and height >= eighths[1]
