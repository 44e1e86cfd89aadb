"""AUTOMATIC1111's hires fix with a latent upscaler: a second, img2img pass at a larger size.

A1111's txt2img with "Hires fix" (its ``StableDiffusionProcessingTxt2Img.sample_hr_pass``):

1. the first pass makes each image's latent at the size asked for, as without it;
2. a latent upscaler ("Latent", "Latent (bicubic)", ...; :data:`LATENT_UPSCALERS`) resizes the
   latent to ``int(width x scale)`` by ``int(height x scale)`` pixels' worth (a latent pixel
   per 8), with ``torch.nn.functional.interpolate``;
3. a new noise is drawn for that size from each image's seed, as its first noise was (A1111
   makes a new ``ImageRNG`` for the pass: variation seed, "Seed resize from" and ENSD too);
4. the pass runs the same sampler over the tail of a longer schedule (:class:`Img2ImgSteps`,
   A1111's ``setup_img2img_steps``): from the upscaled latent plus the noise times the tail's
   first sigma, its ``hires_steps`` steps (the first pass's steps when 0); its step noise comes
   from the pass's own generators, its Brownian trees span the longer schedule.

The image written is the pass's latent decoded; A1111's text keeps the first pass's "Size" and
adds "Denoising strength", "Hires upscale", "Hires steps" (where not 0) and "Hires upscaler".

A1111's other upscalers (Lanczos, ESRGAN, ...) resize the decoded image and encode it again, a
step that draws from the global torch generator in A1111 (the VAE's sample): they are refused.
``tests/generate/test_hires_fix.py`` runs the passes against k-diffusion's samplers under
A1111's hires code, retyped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fulora.generate.samplers import LATENT_UPSCALERS

#: A1111's latent scale: a latent pixel per 8 image pixels (its ``opt_f``)
LATENT_SCALE = 8


def image_size(width: int, height: int, scale: float | None) -> tuple[int, int]:
    """The (width, height) of the images written: the hires pass's, else as asked.

    A1111's hires target is ``int(width x scale)`` by ``int(height x scale)``; one that is not a
    multiple of 8 loses its remainder, as in A1111, whose latent is the target's integer eighth.
    """
    if scale is None:
        return width, height
    target_w, target_h = int(width * scale), int(height * scale)  # A1111's hr_upscale_to_x, _y
    return target_w // LATENT_SCALE * LATENT_SCALE, target_h // LATENT_SCALE * LATENT_SCALE


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """The first pass's latents resized to ``size``, as A1111's latent upscaler resizes them.

    In fp32 (A1111's k-diffusion samples are fp32 whatever the model's dtype).

    Args:
        latents: (images, channels, height, width).
        size: The latent (height, width) of the images' size (:func:`image_size`).
        upscaler: One of :data:`LATENT_UPSCALERS`.
    """
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)
