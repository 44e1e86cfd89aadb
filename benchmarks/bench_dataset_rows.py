"""Does an item of ManifestDataset cost the same in a long manifest as in a short one?

Until session 16 every item rebuilt the manifest's whole path list, so an epoch cost time in the
square of the images (a 6,148-row manifest: 47 ms per item, about 290 s of an epoch's loading).
This times, in one process, an item through ``ManifestDataset`` (warm preprocessing cache)
against the floor, ``PreprocessCache.get`` on the same file, for manifests of 100 to 6,148 rows
(the paper's hybrid training set). The rows repeat 100 phantom images, so every read is a warm
cache hit and the manifest's length is the only thing that changes.

Usage: python benchmarks/bench_dataset_rows.py [--items 600]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_cli import cpu_name

from fulora.data.cache import PreprocessCache
from fulora.data.dataset import ManifestDataset
from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom

ROWS = (100, 1000, 6148)
SIZE = (64, 64)


def per_item_ms(fn, items: int) -> float:
    start = time.perf_counter()
    for i in range(items):
        fn(i)
    return (time.perf_counter() - start) / items * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=600, help="items timed per manifest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = generate_phantom(Path(tmp) / "img", PhantomConfig(per_class=20, grid=False))
        cache = PreprocessCache(Path(tmp) / "cache", size=SIZE)
        print(f"{cpu_name()}; {args.items} items per manifest, warm cache, {SIZE[0]} px\n")
        print("| manifest rows | ManifestDataset item (ms) | PreprocessCache.get (ms) | ratio |")
        print("|---:|---:|---:|---:|")
        for rows in ROWS:
            frame = images.frame.sample(n=rows, replace=True, random_state=0)
            manifest = Manifest(frame.reset_index(drop=True), validate=False)
            dataset = ManifestDataset(manifest, size=SIZE, cache=cache)
            paths = manifest.paths
            items = min(args.items, rows)
            for i in range(items):  # warm: every file in the cache
                dataset[i]
            item = per_item_ms(dataset.__getitem__, items)
            floor = per_item_ms(lambda i, paths=paths: cache.get(paths[i], row=i), items)
            print(f"| {rows:,} | {item:.3f} | {floor:.3f} | {item / floor:.2f} |")


if __name__ == "__main__":
    main()
