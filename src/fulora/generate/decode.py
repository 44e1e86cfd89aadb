"""Generated latents into images: the VAE decode with its NaN guard, overlapped or in the loop.

:class:`Decoder` decodes each batch while the next one denoises (``decode_overlap``) or in the
loop; :func:`decode_latents` is diffusers' decode, with the images that come out NaN in half
precision decoded again in fp32, as AUTOMATIC1111 does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from fulora.errors import DataError

logger = logging.getLogger("fulora")


def to_images(pipe, latents: torch.Tensor, seeds: Sequence[int]) -> np.ndarray:
    """A batch of latents as images (N, H, W, 3) in [0, 1], post-processed as diffusers does."""
    with torch.no_grad():
        pixels = decode_latents(pipe.vae, latents, seeds)
    denormalize = [True] * len(seeds)
    return pipe.image_processor.postprocess(pixels, output_type="np", do_denormalize=denormalize)


class Decoder:
    """Decodes each batch's latents; with ``overlap``, while the next batch denoises.

    The overlapped decode runs on a thread and, on CUDA, a stream of its own: diffusers'
    pipeline waits for the GPU at the start of each call (it copies the timesteps to the device
    and DPM++ reads a step index with ``.item()``), but such waits cover only the work queued on
    the caller's stream, so the decode is not waited for. The first batch is decoded before the
    next one starts (it compiles, autotunes and allocates; the steady rate counts from its end)
    and at most one batch decodes at a time, so memory grows by one batch's latents and one
    decode. A decode's failure raises at the next batch or when the block ends; a batch being
    decoded when the run stops with an error is still written. Without ``overlap`` each batch
    is decoded in the loop, on the caller's thread and stream.
    """

    def __init__(self, pipe, device: torch.device, overlap: bool) -> None:
        self.pipe = pipe
        self.pool = ThreadPoolExecutor(1, "fulora-decode") if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self.pending: tuple[Future, Callable[[np.ndarray], None]] | None = None
        self.first = True

    def decode(self, latents: torch.Tensor, seeds: Sequence[int], then: Callable) -> None:
        """Decode a batch and call ``then(images)`` with its images, on the caller's thread.

        The previous batch's ``then`` runs first (after its decode ends), so batches are
        handed on in order.
        """
        self.finish()
        if self.pool is None:
            then(to_images(self.pipe, latents, seeds))
            return
        ready = None
        if self.stream is not None:  # the decode's stream waits for the latents, not the CPU
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            latents.record_stream(self.stream)  # the allocator must not reuse them meanwhile
        self.pending = (self.pool.submit(self._decode_aside, latents, seeds, ready), then)
        if self.first:
            self.first = False
            self.finish()

    def finish(self) -> None:
        """Wait for the batch being decoded and hand its images on; its failure raises here."""
        if self.pending is None:
            return
        future, then = self.pending
        try:
            images = future.result()
        finally:
            if future.done():  # a wait cut short (Ctrl-C) leaves the batch to __exit__
                self.pending = None
        then(images)

    def _decode_aside(self, latents, seeds, ready) -> np.ndarray:
        if self.stream is None:
            return to_images(self.pipe, latents, seeds)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            return to_images(self.pipe, latents, seeds)  # its copy to the CPU waits for it

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.finish()
            elif self.pending is not None:  # denoised work reaches the disk on an error too
                try:
                    self.finish()
                except Exception:
                    logger.exception("the batch being decoded when the run stopped failed too")
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def decode_latents(vae, latents: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The VAE decode of a batch (in [-1, 1]), as diffusers' pipeline does it, with a NaN guard.

    A half-precision VAE can overflow to NaN on some latents; AUTOMATIC1111 then decodes again
    in fp32 (what its no-half-VAE option does for every image). Here only the images that came
    out NaN are decoded again in fp32, alone, so that every other image keeps its
    half-precision bytes and a resumed run its determinism.

    Raises:
        DataError: An image is NaN even from an fp32 VAE (the latents themselves are broken:
            the UNet overflowed, e.g. with too large a LoRA scale), naming its seeds.
    """
    pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    broken = torch.isnan(pixels).flatten(1).any(dim=1)
    if not bool(broken.any()):
        return pixels
    rows = broken.nonzero().flatten()
    bad_seeds = [seeds[i] for i in rows.tolist()]
    half = vae.dtype
    if half != torch.float32:
        logger.warning("VAE gave NaN in %s for seeds %s: decoding them in fp32", half, bad_seeds)
        vae.to(torch.float32)
        try:
            again = vae.decode(latents[rows].float() / vae.config.scaling_factor)[0]
        finally:
            vae.to(half)
        pixels[rows] = again.to(pixels.dtype)
        still = torch.isnan(again).flatten(1).any(dim=1)
        bad_seeds = [seeds[i] for i in rows[still].tolist()]
    if bad_seeds:
        raise DataError(
            f"the denoised latents of seeds {bad_seeds} decode to NaN even in fp32: the UNet "
            "or the sampler overflowed (try dtype: fp32, a smaller lora_scale, or another sampler)"
        )
    return pixels


def to_uint8(images: np.ndarray, rounding: str = "floor") -> np.ndarray:
    """Decoded images' values in [0, 1] as 8-bit pixels.

    ``floor`` is AUTOMATIC1111's (``255. * x`` in float32, then ``astype(np.uint8)``, in its
    ``process_images_inner``), ``round`` diffusers' ``numpy_to_pil``. A value at or past either
    end is that end, as both clamp first.
    """
    scaled = np.clip(images, 0.0, 1.0).astype(np.float32) * np.float32(255)
    if rounding == "round":
        scaled = scaled.round()
    return scaled.astype(np.uint8)
