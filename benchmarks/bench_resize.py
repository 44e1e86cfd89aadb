"""Shrinking the paper's 100 LoRA images to their buckets: kohya's INTER_AREA (numpy) vs PIL BOX.

Times ``fit_to_bucket`` on each image (decoded once, beforehand), with ``resize="area"``
(:mod:`fulora.lora.resize`, kohya's result) and ``resize="box"`` (PIL's BOX filter, fulora's
until session 25), best of ``--repeats`` passes, in one process.

Usage:
    python benchmarks/bench_resize.py [DATA] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_cli import cpu_name  # benchmarks/ is the script's folder, first on sys.path
from PIL import Image

from fulora.lora.buckets import fit_to_bucket, select_bucket

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/fu-lora-sample/spain_lora_train"


def best_pass(images: list[Image.Image], resize: str, repeats: int) -> float:
    """The fastest of ``repeats`` passes over ``images``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for img in images:
            fit_to_bucket(img, select_bucket(img.size), resize)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.data.rglob("*.png"))
    if not files:
        raise SystemExit(f"no PNG under {args.data}")
    images = [Image.open(f).convert("RGB") for f in files]
    shrunk = sum(select_bucket(img.size).resized != img.size for img in images)
    print(f"{len(images)} images ({shrunk} shrunk), {cpu_name()}")
    seconds = {resize: best_pass(images, resize, args.repeats) for resize in ("area", "box")}
    for resize, s in seconds.items():
        per_image = 1000 * s / len(images)
        print(f"  {resize:>4}: {per_image:6.1f} ms per image ({s / seconds['box']:.1f}x box)")


if __name__ == "__main__":
    main()
