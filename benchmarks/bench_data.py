"""Data-path benchmark: one epoch of decoding with and without the preprocessing cache.

Measures, in one process, the time to produce every item of a ManifestDataset at the
classifier size (224x224, grayscale) three ways:
  * direct  - decode the PNG and resize on every access (what a plain ImageFolder does);
  * cold    - first epoch through PreprocessCache (decode + resize + write the .npy);
  * warm    - later epochs through the cache (read the .npy);
  * memory  - later epochs with in_memory=True on top of the cache.

Usage:
    python benchmarks/bench_data.py [DATA] [--epochs 3] [--size 224]

DATA defaults to ../shared/data/fu-lora-sample/spain_lora_train (100 FETAL_PLANES_DB PNGs,
640x392 to 1495x787); without it, a phantom set is generated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_cli import cpu_name  # benchmarks/ is the script's folder, first on sys.path

from fulora.data.cache import PreprocessCache
from fulora.data.dataset import ManifestDataset
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/fu-lora-sample/spain_lora_train"


def epoch(ds: ManifestDataset) -> float:
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default=str(DEFAULT))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data)
        if not data.exists():
            print(f"{data} not found: using 100 phantom images")
            generate_phantom(Path(tmp) / "phantom", PhantomConfig(per_class=20, grid=False))
            data = Path(tmp) / "phantom"
        manifest = read_any(data)
        size = (args.size, args.size)
        direct = ManifestDataset(manifest, size=size)
        cache = PreprocessCache(Path(tmp) / "cache", size=size)
        cached = ManifestDataset(manifest, cache=cache)
        memory = ManifestDataset(manifest, cache=cache, in_memory=True)
        t_direct = min(epoch(direct) for _ in range(args.epochs))
        t_cold = epoch(cached)
        t_warm = min(epoch(cached) for _ in range(args.epochs))
        epoch(memory)
        t_mem = min(epoch(memory) for _ in range(args.epochs))
    n = len(manifest)
    print(
        f"data: {data} ({n} images), size {args.size}x{args.size}, 1 thread, "
        f"{cpu_name()}, torch {torch.__version__}"
    )
    print(f"{'path':<8}{'s/epoch':>10}{'img/s':>10}{'speed-up':>10}")
    for name, t in (("direct", t_direct), ("cold", t_cold), ("warm", t_warm), ("memory", t_mem)):
        print(f"{name:<8}{t:>10.3f}{n / t:>10.0f}{t_direct / t:>9.1f}x")


if __name__ == "__main__":
    main()
