"""AUTOMATIC1111's hires fix with a latent upscaler: a second, img2img pass at a larger size.

A1111's txt2img with "Hires fix" (its ``StableDiffusionProcessingTxt2Img.sample_hr_pass``):

1. the first pass makes each image's latent at the size asked for, as without it;
2. a latent upscaler ("Latent", "Latent (bicubic)", ...; ``samplers.LATENT_UPSCALERS``)
   resizes the latent with ``torch.nn.functional.interpolate`` to the target
   (``hires_size.hires_target``: the size times "Hires upscale", or "Hires resize"'s width and
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

A1111's image upscalers that need no weights, "None", "Lanczos" and "Nearest"
(``samplers.IMAGE_UPSCALERS``), take step 2 in pixels instead (:func:`upscale_decoded`): the
first pass's latent decoded and floored to 8 bits, resized with PIL to A1111's
``hr_upscale_to_x`` and ``_y`` as its ``images.resize_image`` and ``Upscaler.upscale`` resize
(:func:`upscale_image`), and encoded again, the VAE's sample drawn as A1111 draws it: from
torch's global generator, which its ``ImageRNG`` last seeded with the batch's last seed; fulora
draws each image's from its own seed, which is A1111's at batch size 1 (:func:`encode_images`).
Its model upscalers (ESRGAN, SwinIR, ...) need weights fulora does not load: refused.
``tests/generate/test_hires_fix.py`` runs the passes against k-diffusion's samplers under
A1111's hires code, retyped; ``test_hires_images.py`` the image upscalers against A1111's
resize (v1.8+), recorded. The pass's size is ``fulora.generate.hires_size``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fulora.generate.decode import to_images, to_uint8
from fulora.generate.hires_size import LATENT_SCALE, HiresTarget, upscaler_scale
from fulora.generate.samplers import LATENT_UPSCALERS

#: PIL's filter of each of A1111's image upscalers that resizes by the scale first
_UPSCALER_FILTERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def upscale_latents(
    latents: torch.Tensor, target: HiresTarget, upscaler: str, vae_scale: int = LATENT_SCALE
) -> torch.Tensor:
    """The first pass's latents resized and cut to ``target``, as A1111's latent upscaler.

    In fp32 (A1111's k-diffusion samples are fp32 whatever the model's dtype).

    Args:
        latents: (images, channels, height, width).
        target: The pass's target (``hires_size.hires_target``).
        upscaler: One of ``samplers.LATENT_UPSCALERS``.
        vae_scale: Image pixels per latent pixel (8 for SD; the tiny test models' fewer).
    """
    mode, antialias = LATENT_UPSCALERS[upscaler]
    width, height = (side // vae_scale for side in target.upscaled)
    resized = F.interpolate(latents.float(), (height, width), mode=mode, antialias=antialias)
    return _cut(resized, target, vae_scale)


def _cut(latents: torch.Tensor, target: HiresTarget, vae_scale: int) -> torch.Tensor:
    """Latents of ``target.upscaled`` (or more) cut to its box (A1111's ``truncate_x``, ``_y``)."""
    width, height = (side // vae_scale for side in target.upscaled)
    left, top, right, bottom = (side // vae_scale for side in target.box)
    return latents[:, :, :height, :width][:, :, top:bottom, left:right]


def upscale_image(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """A decoded image resized to (width, height) by one of A1111's image upscalers.

    As its ``images.resize_image`` (mode 0, "Just resize") with that upscaler: "None" resizes
    with Lanczos at once. "Lanczos" and "Nearest", where the image grows (the scale, the larger
    of the two sides' ratios, above 1), go through its ``Upscaler.upscale`` (v1.8+): unless the
    image already covers the scaled size cut down to a multiple of 8, it is resized by the
    scale with the upscaler's filter; then, where not already that size, to the multiple of 8
    with Lanczos. Last, where not already (width, height), to it with Lanczos.
    """
    lanczos = Image.Resampling.LANCZOS
    if upscaler == "None":
        return image.resize((width, height), resample=lanczos)
    scale, eighths = upscaler_scale(*image.size, (width, height))
    if scale > 1.0:
        if image.width < eighths[0] or image.height < eighths[1]:
            by_scale = (int(image.width * scale), int(image.height * scale))
            image = image.resize(by_scale, resample=_UPSCALER_FILTERS[upscaler])
        if image.size != eighths:
            image = image.resize(eighths, resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


def encode_images(
    vae, pixels: torch.Tensor, seeds: Sequence[int], skipped: tuple[int, ...] = ()
) -> torch.Tensor:
    """Images in [0, 1] (N, 3, H, W) as latents, each the VAE's sample as A1111 draws it.

    A1111 (``images_tensor_to_samples``) encodes each image alone, in the VAE's dtype, from
    ``image * 2 - 1``, and its VAE samples ``mean + std * torch.randn(mean.shape)``: an fp32
    draw from torch's global CPU generator, which its ``ImageRNG`` seeded with the image's seed
    at batch size 1 (after a draw of ``skipped``'s shape, where it drew the "Seed resize from"
    noise there), then times the VAE's scaling factor, in fp32.
    """
    latents = []
    for image, seed in zip(pixels, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        if skipped:
            torch.randn(skipped, generator=generator)
        inputs = image[None].to(vae.device, vae.dtype) * 2 - 1
        dist = vae.encode(inputs).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(vae.device)
        latents.append((dist.mean + dist.std * noise) * vae.config.scaling_factor)
    return torch.cat(latents)


def upscale_decoded(
    pipe,
    latents: torch.Tensor,
    target: HiresTarget,
    upscaler: str,
    seeds: Sequence[int],
    skipped: tuple[int, ...] = (),
) -> torch.Tensor:
    """The first pass's latents decoded, resized by an image upscaler, encoded and cut.

    As A1111's hires pass with "None", "Lanczos" or "Nearest": the decoded images
    (``decode.to_images``, with its NaN guard) floored to 8 bits, resized to
    ``target.resized`` (:func:`upscale_image`), encoded again (:func:`encode_images`) and cut
    as the latent upscalers' are. A model whose latent pixel is fewer than 8 image pixels
    (fulora's tiny test models) is first cut to the latent size the latent upscalers give;
    SD's already is.
    """
    resized = [
        upscale_image(Image.fromarray(image), *target.resized, upscaler)
        for image in to_uint8(to_images(pipe, latents, seeds), "floor")
    ]
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in resized]).astype(np.float32) / 255)
    with torch.no_grad():
        encoded = encode_images(pipe.vae, pixels.permute(0, 3, 1, 2), seeds, skipped)
    return _cut(encoded, target, pipe.vae_scale_factor)
