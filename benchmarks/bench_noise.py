"""What each noise source costs per image: rng nv (A1111's NV, Philox in numpy) vs cpu.

Each source draws the noise of 512x512 SD1.5 images (4 x 64 x 64 numbers each), the best of 3
rounds, in this process: the starting noise alone (200 seeds), and all the noise of Euler a at
30 steps (the start and 29 step draws, as ``fulora.generate.noise.ImageNoise`` gives it;
batches of 8 images, 10 batches):

    python benchmarks/bench_noise.py
"""

from __future__ import annotations

import platform
import time

import torch

from fulora.generate.noise import ImageNoise, philox_randn

SHAPE = torch.Size((1, 4, 64, 64))
SEEDS = 200
STEPS, BATCH, BATCHES = 30, 8, 10


def _cpu(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE.numel(), generator=torch.Generator().manual_seed(seed))


def _nv(seed: int) -> torch.Tensor:
    return philox_randn(seed, SHAPE.numel())


def _ms_per_image(draw) -> float:
    draw(0)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for seed in range(SEEDS):
            draw(seed)
        best = min(best, time.perf_counter() - start)
    return best / SEEDS * 1e3


def _euler_a_batch(rng: str, first_seed: int) -> None:
    """One batch's noise for Euler a: as generate draws it (nv) or as diffusers does (cpu)."""
    seeds = range(first_seed, first_seed + BATCH)
    noise = ImageNoise(rng, seeds, SHAPE, torch.device("cpu"))
    noise.first()
    for step in range(STEPS - 1):  # k-diffusion draws none for the last step
        if noise.generators is None:
            noise.step_noise(step)
        else:
            torch.cat([torch.randn(SHAPE, generator=g) for g in noise.generators])


def _euler_a_ms_per_image(rng: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for batch in range(BATCHES):
            _euler_a_batch(rng, batch * BATCH)
        best = min(best, time.perf_counter() - start)
    return best / (BATCHES * BATCH) * 1e3


def main() -> None:
    cpu, nv = _ms_per_image(_cpu), _ms_per_image(_nv)
    cpu_a, nv_a = _euler_a_ms_per_image("cpu"), _euler_a_ms_per_image("nv")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| source | ms per 512x512 image | vs cpu |\n|---|---:|---:|")
    print(f"| cpu (torch.randn), starting noise | {cpu:.3f} | 1.00x |")
    print(f"| nv (philox_randn), starting noise | {nv:.3f} | {nv / cpu:.1f}x slower |")
    print(f"| cpu, Euler a at {STEPS} steps | {cpu_a:.3f} | 1.00x |")
    print(f"| nv, Euler a at {STEPS} steps | {nv_a:.3f} | {nv_a / cpu_a:.1f}x slower |")


if __name__ == "__main__":
    main()
