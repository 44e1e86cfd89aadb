"""Is a classifier epoch limited by compute or by decoding? ResNet18 from scratch, 224 px.

Times, in one process, over the 100 Spanish LoRA images (batch 24, SGD, paper protocol):
  * data only, no cache  - decode + resize + normalise every image (no model);
  * data only, cache     - the same through a warm PreprocessCache;
  * train step only      - forward + backward + SGD step on tensors already in memory;
  * full epoch, cache    - what `fulora classify train` does per epoch (DataLoader path);
  * full epoch, preload  - the uint8 tensor path (`preload: true`).

Usage: python benchmarks/bench_classify.py [DATA] [--arch resnet18] [--epochs 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fulora.classify.registry import create_model
from fulora.classify.train import build_transforms
from fulora.data.cache import PreprocessCache
from fulora.data.dataset import ManifestDataset
from fulora.data.readers import read_any

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/fu-lora-sample/spain_lora_train"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (fills caches, allocators)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default=str(DEFAULT))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    manifest = read_any(args.data)
    classes = list(manifest.counts("label"))
    size = (args.size, args.size)
    _, norm = build_transforms("none", args.size, "imagenet")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cache = PreprocessCache(Path(tmp), size=size)
        direct = ManifestDataset(manifest, classes, size=size, channels=3, transform=norm)
        cached = ManifestDataset(manifest, classes, cache=cache, channels=3, transform=norm)
        cached.preload()
        model, _ = create_model(args.arch, len(classes), pretrained=False)
        model.to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        stored, targets = cached.uint8_tensor()
        stored, targets = stored.to(device), targets.to(device)
        batches = [
            (i, min(i + args.batch_size, len(manifest)))
            for i in range(0, len(manifest), args.batch_size)
        ]
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        def data_only(ds):
            for _ in DataLoader(ds, batch_size=args.batch_size, shuffle=True):
                pass

        def compute_only():
            x = (stored[:1].float() / 255).expand(args.batch_size, 3, -1, -1)
            for a, b in batches:
                step(((x[: b - a] - mean) / std).contiguous(), targets[a:b])
            if device.type == "cuda":
                torch.cuda.synchronize()

        def full_epoch():
            for x, y in DataLoader(cached, batch_size=args.batch_size, shuffle=True):
                step(x.to(device), y.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()

        def preload_epoch():
            order = torch.randperm(len(stored), device=device)
            for a, b in batches:
                idx = order[a:b]
                x = (stored[idx].float() / 255).expand(-1, 3, -1, -1)
                step((x - mean) / std, targets[idx])
            if device.type == "cuda":
                torch.cuda.synchronize()

        results = {
            "data only, no cache": timed(lambda: data_only(direct), args.repeats),
            "data only, cache": timed(lambda: data_only(cached), args.repeats),
            "train step only": timed(compute_only, args.repeats),
            "full epoch, cache": timed(full_epoch, args.repeats),
            "full epoch, preload": timed(preload_epoch, args.repeats),
        }
    n = len(manifest)
    print(
        f"{args.arch}, {n} images from {args.data}, {args.size} px, batch {args.batch_size}, "
        f"{device} ({platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}"
    )
    compute = results["train step only"]
    for name, seconds in results.items():
        print(
            f"{name:<22}{seconds:>8.2f} s/epoch  {n / seconds:>8.1f} img/s  "
            f"{100 * seconds / compute:>6.0f}% of compute"
        )


if __name__ == "__main__":
    main()
