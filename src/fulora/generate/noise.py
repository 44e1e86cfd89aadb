"""Each image's noise, drawn as AUTOMATIC1111 draws it with its RNG settings.

A1111 (``modules/rng.py``, ``ImageRNG``) seeds one generator per image with the image's seed
and draws the image's starting noise from it, in fp32; a sampler that adds noise at each step
(Euler a) draws each step's noise after it from the same generator, or, with the setting "Eta
noise seed delta" (ENSD, ``eta_noise_seed_delta`` here), from a new one seeded with the seed
plus the delta. Its setting "Random number generator source" (``randn_source``, the PNG text's
``RNG``) picks the generator, and ``rng`` picks the same one here:

- ``cpu``: torch's CPU generator. fulora's default, and its only source until session 28: the
  same images on every machine, GPU or not.
- ``gpu``: A1111's default, torch's generator on the GPU (CUDA's Philox 4x32-10): other numbers
  than the CPU's. On a CUDA device only.
- ``nv``: A1111's imitation of CUDA's numbers on the CPU (:func:`philox_randn`), for machines
  without an NVIDIA GPU. Not a torch generator: the scheduler takes Euler a's step noise from
  :meth:`ImageNoise.step_noise` instead (``A1111EulerAncestralScheduler.step_noise``).

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


class ImageNoise:
    """A batch's noise as A1111's ``ImageRNG`` draws it: the starting latents, then each step's.

    Args:
        rng: ``cpu``, ``gpu`` or ``nv`` (see the module).
        seeds: Each image's seed.
        shape: One image's latent shape (:func:`latent_shape`).
        device: The run's device (``gpu`` draws there).
        eta_noise_seed_delta: A1111's ENSD: the step noise is drawn from generators seeded with
            each seed plus it (0: from the starting noise's generators, after it).
        variation_seeds: A1111's variation seed of each image (its "subseed"), or None.
        variation_strength: How far each image's starting noise moves towards its variation
            seed's (A1111's :func:`slerp`; 0: not at all, 1: all the way).
        resize_from: A1111's "Seed resize from", the (height, width) in latents whose noise
            the starting noise takes in its middle (:func:`centred`), or None.
    """

    def __init__(
        self,
        rng: str,
        seeds: Sequence[int],
        shape: torch.Size,
        device: torch.device,
        eta_noise_seed_delta: int = 0,
        variation_seeds: Sequence[int] | None = None,
        variation_strength: float = 0.0,
        resize_from: tuple[int, int] | None = None,
    ) -> None:
        self.rng, self.seeds, self.shape, self.device = rng, list(seeds), shape, device
        self.delta = eta_noise_seed_delta
        self.variation_seeds = list(variation_seeds or [])
        self.variation_strength = variation_strength
        resized = None if resize_from is None else torch.Size((*shape[:2], *resize_from))
        self.resized = resized if resized != shape else None  # A1111: the same size is none
        #: where diffusers draws Euler a's step noise (None for ``nv``: see :meth:`step_noise`)
        self.generators: list[torch.Generator] | None = None

    def first(self) -> torch.Tensor:
        """Each image's starting latents, fp32 where they are drawn; sets :attr:`generators`.

        For ``cpu`` and ``gpu``, the values diffusers draws from the same generators in fp32
        (``randn_tensor``), each generator left where diffusers would leave it, so fp32 images
        are unchanged, Euler a's later noise included. Drawn in the run's dtype instead, a
        seed's fp16 image was another image on torch 2.11, whose CPU ``randn`` gives other
        numbers in half precision than in fp32 (2.14.1 gives the same; pytorch/pytorch#179834
        changed that kernel). A1111 likewise draws its noise in fp32.

        With a variation strength, each image's noise is A1111's :func:`slerp` from it to the
        first draw of its variation seed (drawn by the same source). With ``resize_from``,
        both are drawn at that size and put in the middle of the image's first draw
        (:func:`centred`), as A1111's "Seed resize from" does.

        Returns:
            (len(seeds), channels, height / scale, width / scale).
        """
        noise, self.generators = self._first_draws(self.seeds, self.shape)
        if self.delta and self.generators is not None:  # new generators for the step noise
            self.generators = image_generators(self.rng, self._step_seeds(), self.device)
        shape = self.resized or self.shape
        base = noise if self.resized is None else self._first_draws(self.seeds, shape)[0]
        if self.variation_strength:
            varied, _ = self._first_draws(self.variation_seeds, shape)
            strength = self.variation_strength
            base = torch.stack([slerp(strength, a, b) for a, b in zip(base, varied, strict=True)])
        return base if self.resized is None else centred(noise, base)

    def _first_draws(self, seeds: list[int], shape: torch.Size):
        """Each seed's first draw, and the generators that drew it (None for ``nv``)."""
        if self.rng == "nv":
            return torch.stack([self._philox(seed, 0, shape) for seed in seeds]), None
        generators = image_generators(self.rng, seeds, self.device)
        draws = [torch.randn(shape, generator=g, device=g.device) for g in generators]
        return torch.cat(draws), generators

    def step_noise(self, step: int) -> torch.Tensor:
        """The batch's noise for sampler step ``step`` (0: the first), fp32, as A1111 draws it.

        Each image's generator takes its next draw for each step. For ``nv``, draw ``step +
        1`` of the image's seed (draw 0 was the starting noise), or with ENSD draw ``step`` of
        seed + ENSD, on the CPU. For ``cpu`` and ``gpu``, the next draw of :attr:`generators`
        (so each step must be asked for once, in order), where they draw.
        """
        if self.generators is not None:
            return torch.cat(
                [torch.randn(self.shape, generator=g, device=g.device) for g in self.generators]
            )
        first_draw = 0 if self.delta else 1
        return torch.stack([self._philox(s, first_draw + step) for s in self._step_seeds()])

    def _step_seeds(self) -> list[int]:
        return [seed + self.delta for seed in self.seeds]

    def _philox(self, seed: int, draw: int, shape: torch.Size | None = None) -> torch.Tensor:
        shape = shape or self.shape
        return philox_randn(seed, shape.numel(), offset=draw).reshape(shape[1:])


def centred(noise: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` put in the middle of ``noise`` (cropped to its middle where larger), as A1111.

    A1111's ``ImageRNG.first`` for "Seed resize from": the offsets are floor-halved size
    differences, and where ``other`` is larger by an odd number the copied part is one row or
    column short of ``noise``'s size, which keeps ``noise`` there; kept, for A1111's images.
    """
    x = noise.clone()
    (height, width), (other_height, other_width) = noise.shape[-2:], other.shape[-2:]
    dy, dx = (height - other_height) // 2, (width - other_width) // 2
    h = other_height if dy >= 0 else other_height + 2 * dy
    w = other_width if dx >= 0 else other_width + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    x[..., ty : ty + h, tx : tx + w] = other[..., sy : sy + h, sx : sx + w]
    return x


def slerp(strength: float, noise: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """One image's noise moved towards ``other`` by ``strength``, as A1111's ``rng.slerp``.

    Spherical interpolation as A1111 computes it on an image's (channels, height, width) noise:
    the angle is taken between the columns along dimension 1 (height), one per channel and
    x, and where the columns are on average nearly parallel (mean cosine above 0.9995) A1111
    mixes linearly with the weights the other way round (``noise * strength + other * (1 -
    strength)``); both kept, so that a variation seed makes A1111's image.
    """
    unit, other_unit = (t / torch.norm(t, dim=1, keepdim=True) for t in (noise, other))
    cosine = (unit * other_unit).sum(1)
    if cosine.mean() > 0.9995:
        return noise * strength + other * (1 - strength)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    near = (torch.sin((1.0 - strength) * angle) / sine).unsqueeze(1)
    far = (torch.sin(strength * angle) / sine).unsqueeze(1)
    return near * noise + far * other


def image_generators(rng: str, seeds: Sequence[int], device: torch.device):
    """Each image's torch generator, seeded with its seed, where ``rng`` (cpu or gpu) draws."""
    where = torch.device(device) if rng == "gpu" else torch.device("cpu")
    return [torch.Generator(where).manual_seed(seed) for seed in seeds]


def latent_shape(pipe, height: int, width: int) -> torch.Size:
    """One image's latent shape, (1, channels, height / scale, width / scale)."""
    scale = pipe.vae_scale_factor
    return torch.Size((1, pipe.unet.config.in_channels, height // scale, width // scale))
