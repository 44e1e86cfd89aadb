"""What each noise source costs per image: rng nv (A1111's NV, Philox in numpy) vs cpu.

Each source draws the starting noise of a 512x512 SD1.5 image (4 x 64 x 64 numbers) for 200
seeds, the best of 3 rounds, in this process:

    python benchmarks/bench_noise.py
"""

from __future__ import annotations

import platform
import time

import torch

from fulora.generate.noise import philox_randn

COUNT = 4 * 64 * 64
SEEDS = 200


def _cpu(seed: int) -> torch.Tensor:
    return torch.randn(COUNT, generator=torch.Generator().manual_seed(seed))


def _nv(seed: int) -> torch.Tensor:
    return philox_randn(seed, COUNT)


def _ms_per_image(draw) -> float:
    draw(0)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for seed in range(SEEDS):
            draw(seed)
        best = min(best, time.perf_counter() - start)
    return best / SEEDS * 1e3


def main() -> None:
    cpu, nv = _ms_per_image(_cpu), _ms_per_image(_nv)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| source | ms per 512x512 image | vs cpu |\n|---|---:|---:|")
    print(f"| cpu (torch.randn) | {cpu:.3f} | 1.00x |")
    print(f"| nv (philox_randn) | {nv:.3f} | {nv / cpu:.1f}x slower |")


if __name__ == "__main__":
    main()
