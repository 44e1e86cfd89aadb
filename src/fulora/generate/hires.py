"""AUTOMATIC1111's hires fix with a latent upscaler: a second, img2img pass at a larger size.

A1111's txt2img with "Hires fix" (its ``StableDiffusionProcessingTxt2Img.sample_hr_pass``):

1. the first pass makes each image's latent at the size asked for, as without it;
2. a latent upscaler ("Latent", "Latent (bicubic)", ...; ``samplers.LATENT_UPSCALERS``)
   resizes the latent with ``torch.nn.functional.interpolate`` to the target
   (:func:`hires_target`: the size times "Hires upscale", or "Hires resize"'s width and
   height, the aspect ratio kept and the excess cut from both sides), a latent pixel per 8;
3. a new noise is drawn for that size from each image's seed, as its first noise was (A1111
   makes a new ``ImageRNG`` for the pass: variation seed, "Seed resize from" and ENSD too);
4. the pass runs the same sampler over the end of a longer schedule
   (``samplers.Img2ImgSteps``, A1111's ``setup_img2img_steps``), ``hires_steps`` steps (the
   first pass's steps when 0): a k-diffusion sampler over the tail of its sigmas, from the
   upscaled latent plus the noise times the tail's first sigma (``sample_img2img``); DDIM,
   PLMS and UniPC over the lowest ``hires_steps - 1`` points of their longer grid, from the
   latent and the noise mixed at the point above (``CompVisSampler.sample_img2img``: DDIM
   and PLMS take ``hires_steps - 2`` steps between them); its step noise comes from the
   pass's own generators, its Brownian trees span the longer schedule; the prompts' edits
   are scheduled over its own steps.

The image written is the pass's latent decoded; A1111's text keeps the first pass's "Size" and
adds "Denoising strength", "Hires upscale" or "Hires resize", "Hires steps" (where not 0) and
"Hires upscaler".

A1111's other upscalers (Lanczos, ESRGAN, ...) resize the decoded image and encode it again, a
step that draws from the global torch generator in A1111 (the VAE's sample): they are refused.
``tests/generate/test_hires_fix.py`` runs the passes against k-diffusion's samplers under
A1111's hires code, retyped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fulora.generate.samplers import LATENT_UPSCALERS

#: A1111's latent scale: a latent pixel per 8 image pixels (its ``opt_f``)
LATENT_SCALE = 8


@dataclass(frozen=True)
class HiresTarget:
    """Where A1111's hires pass upscales the latent to, and the part of it kept (pixels).

    Attributes:
        upscaled: (width, height) the latent is resized to, multiples of 8 (A1111's
            ``hr_upscale_to_x`` and ``_y``, their latent their integer eighth).
        box: (left, top, right, bottom) of it kept, multiples of 8 (A1111's ``truncate_x``
            and ``_y``: with "Hires resize" of another aspect ratio, the excess cut from both
            sides, the odd latent pixel from the right or bottom).
    """

    upscaled: tuple[int, int]
    box: tuple[int, int, int, int]

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
    return HiresTarget(
        (latent_x * LATENT_SCALE, latent_y * LATENT_SCALE),
        tuple(side * LATENT_SCALE for side in box),
    )


def upscale_latents(
    latents: torch.Tensor, target: HiresTarget, upscaler: str, vae_scale: int = LATENT_SCALE
) -> torch.Tensor:
    """The first pass's latents resized and cut to ``target``, as A1111's latent upscaler.

    In fp32 (A1111's k-diffusion samples are fp32 whatever the model's dtype).

    Args:
        latents: (images, channels, height, width).
        target: The pass's target (:func:`hires_target`).
        upscaler: One of ``samplers.LATENT_UPSCALERS``.
        vae_scale: Image pixels per latent pixel (8 for SD; the tiny test models' fewer).
    """
    mode, antialias = LATENT_UPSCALERS[upscaler]
    width, height = (side // vae_scale for side in target.upscaled)
    resized = F.interpolate(latents.float(), (height, width), mode=mode, antialias=antialias)
    left, top, right, bottom = (side // vae_scale for side in target.box)
    return resized[:, :, top:bottom, left:right]
