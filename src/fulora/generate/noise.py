"""Each image's starting noise, drawn as AUTOMATIC1111 draws it with its RNG setting.

A1111 (``modules/rng.py``, ``ImageRNG``) seeds one generator per image with the image's seed
and draws the image's noise from it, in fp32, and with Euler a each step's noise after it. Its
setting "Random number generator source" (``randn_source``, the PNG text's ``RNG``) picks the
generator, and ``rng`` picks the same one here:

- ``cpu``: torch's CPU generator. fulora's default, and its only source until session 28: the
  same images on every machine, GPU or not.
- ``gpu``: A1111's default, torch's generator on the GPU (CUDA's Philox 4x32-10): other numbers
  than the CPU's. On a CUDA device only.
- ``nv``: A1111's imitation of CUDA's numbers on the CPU (:func:`philox_randn`), for machines
  without an NVIDIA GPU. It draws the starting noise only: a sampler that draws noise at each
  step (Euler a) is refused with it.

A1111's images made at its defaults (no ``RNG`` in their text) start from the ``gpu`` noise;
``nv`` gives the same numbers within CUDA's float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Philox 4x32-10 (Salmon et al., SC'11; Random123, cuRAND's PHILOX4_32_10): round multipliers
# and the key's increments (the golden ratio and sqrt(3) - 1, as 32-bit fractions)
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
# cuRAND's Box-Muller constants (CURAND_2POW32_INV, CURAND_2POW32_INV_2PI) in float32, as
# A1111's NV source rounds them
_TO_UNIT = np.float32(2.3283064e-10)
_TO_ANGLE = np.float32(2.3283064e-10 * 6.2831855)


def philox_randn(seed: int, count: int, offset: int = 0) -> torch.Tensor:
    """``count`` standard normal numbers as CUDA's ``torch.randn`` draws them, on the CPU.

    A1111's "NV" source (``modules/rng_philox.py``): number ``i`` of a draw is the first
    Box-Muller output of Philox 4x32-10 with counter ``(offset, 0, i, 0)`` and the 64-bit seed
    as key; each further draw of the same generator takes the next ``offset``. The transform
    runs in float64 and is rounded to float32 once, as A1111's does, so its numbers are
    A1111's to the bit (CUDA's own float32 transform may differ in the last bit).

    Args:
        seed: The generator's seed (0 to 2**64 - 1).
        count: How many numbers.
        offset: Which draw of the generator (0: the first, the image's starting noise).

    Returns:
        fp32 CPU tensor of ``count`` numbers.
    """
    counter = np.zeros((4, count), dtype=np.uint64)
    counter[0] = offset
    counter[2] = np.arange(count, dtype=np.uint64)
    key = [np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)]
    for round_ in range(10):
        if round_:  # the key moves on between rounds
            key = [(k + np.uint64(w)) & _MASK32 for k, w in zip(key, _PHILOX_W, strict=True)]
        counter = _philox_round(counter, key)
    unit = counter[0].astype(np.float64) * _TO_UNIT + _TO_UNIT / 2
    angle = counter[1].astype(np.float64) * _TO_ANGLE + _TO_ANGLE / 2
    normal = np.sqrt(-2.0 * np.log(unit)) * np.sin(angle)
    return torch.from_numpy(normal.astype(np.float32))


def _philox_round(counter: np.ndarray, key: list[np.uint64]) -> np.ndarray:
    """One Philox 4x32 round: two 32x32->64-bit products, their halves mixed with the key."""
    first = counter[0] * np.uint64(_PHILOX_M[0])  # < 2**64: no overflow
    third = counter[2] * np.uint64(_PHILOX_M[1])
    return np.stack(
        [
            (third >> np.uint64(32)) ^ counter[1] ^ key[0],
            third & _MASK32,
            (first >> np.uint64(32)) ^ counter[3] ^ key[1],
            first & _MASK32,
        ]
    )


def image_generators(rng: str, seeds: Sequence[int], device: torch.device):
    """Each image's generator, seeded with its seed, where ``rng`` draws (None for ``nv``).

    The pipeline draws Euler a's step noise from them after the starting noise, as A1111
    draws it from each image's generator.
    """
    if rng == "nv":
        return None
    where = torch.device(device) if rng == "gpu" else torch.device("cpu")
    return [torch.Generator(where).manual_seed(seed) for seed in seeds]


def initial_noise(
    pipe, generators: Sequence[torch.Generator], height: int, width: int
) -> torch.Tensor:
    """Each image's starting latents, drawn in fp32 where its generator is.

    The values diffusers draws from the same generators in fp32 (``randn_tensor``), and each
    generator is left where diffusers would leave it, so fp32 images are unchanged, a sampler's
    later noise (Euler a) included. Drawn in the run's dtype instead, a seed's fp16 image was
    another image on torch 2.11, whose CPU ``randn`` gives other numbers in half precision than
    in fp32 (2.14.1 gives the same; pytorch/pytorch#179834 changed that kernel). AUTOMATIC1111
    likewise draws its noise in fp32.

    Args:
        pipe: The pipeline (its UNet's latent channels and its VAE's scale factor).
        generators: One generator per image, seeded with the image's seed (CPU or CUDA).
        height: The images' height in pixels.
        width: The images' width in pixels.

    Returns:
        fp32 latents (len(generators), channels, height / scale, width / scale), on the
        generators' device.
    """
    shape = latent_shape(pipe, height, width)
    return torch.cat(
        [torch.randn(shape, generator=g, device=g.device) for g in generators]  # fp32
    )


def nv_noise(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Each image's starting latents from A1111's "NV" source (:func:`philox_randn`), fp32 CPU."""
    shape = latent_shape(pipe, height, width)
    return torch.stack([philox_randn(seed, shape.numel()).reshape(shape[1:]) for seed in seeds])


def latent_shape(pipe, height: int, width: int) -> torch.Size:
    """One image's latent shape, (1, channels, height / scale, width / scale)."""
    scale = pipe.vae_scale_factor
    return torch.Size((1, pipe.unet.config.in_channels, height // scale, width // scale))
