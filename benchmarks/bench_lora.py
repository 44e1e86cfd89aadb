"""LoRA training speed and memory: steps/s with and without latent caching.

Runs `fulora.lora.train.train_lora` (the real training loop) on phantom plane folders, in one
process, for each setting, and prints steps/s and, on CUDA, peak GPU memory.

CPU (default): the tiny in-code SD model at 64 px buckets, rank 8.
GPU: --model sd15-random builds Stable Diffusion 1.5's architecture with random weights (the
cost does not depend on the values) and runs 512 px buckets, rank 128, batch 1 and 8, with and
without latent caching and gradient checkpointing, mixed precision fp16:

    python benchmarks/bench_lora.py                                # CPU, tiny model
    python benchmarks/bench_lora.py --model sd15-random --resolution 512 --rank 128 \\
        --batch-sizes 1 8 --checkpointing both --steps 30          # GPU
"""

from __future__ import annotations

import argparse
import itertools
import logging
import platform
import tempfile
from pathlib import Path

import torch

from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any
from fulora.lora.tiny import save_sd15_random, save_tiny_model
from fulora.lora.train import LoraTrainConfig, train_lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=20, help="images per plane (5 planes)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=["kohya", "attention"],
        default=["kohya"],
        help="LoRA layer sets to compare (kohya: the paper's; attention: q/k/v/out only)",
    )
    args = parser.parse_args()
    logging.getLogger("fulora").setLevel(logging.WARNING)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = (
            save_tiny_model(tmp / "model")
            if args.model == "tiny"
            else save_sd15_random(tmp / "model")
        )
        generate_phantom(tmp / "data", PhantomConfig(per_class=args.images, grid=False))
        data = read_any(tmp / "data")
        checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
        rows = []
        settings = itertools.product(args.targets, args.batch_sizes, [False, True], checkpointing)
        for targets, batch, cache, ckpt in settings:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            cfg = LoraTrainConfig(
                base=str(model),
                rank=args.rank,
                alpha=args.rank,
                targets=targets,
                resolution=args.resolution,
                bucket_step=64 if args.resolution >= 256 else 16,
                batch_size=batch,
                repeats=1000,
                max_steps=args.steps,
                cache_latents=cache,
                gradient_checkpointing=ckpt,
                optimizer="adamw8bit",
                mixed_precision="fp16",
                sample_every=0,
                sample_steps=1,
                seed=0,
            )
            out = tmp / f"run-{targets}-{batch}-{cache}-{ckpt}"
            record = train_lora(data, out, cfg, progress=False)
            rows.append(
                (
                    targets,
                    batch,
                    cache,
                    ckpt,
                    record["steps_per_s"],
                    record["steps_per_s"] * batch,
                    record["peak_gpu_memory_gb"],
                    record["optimizer"],
                    record["buckets"],
                )
            )
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})"
    print(
        f"model {args.model}, {args.resolution} px buckets, rank {args.rank}, {args.steps} "
        f"steps, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'targets':>9} {'batch':>5} {'cache':>6} {'ckpt':>5} {'steps/s':>8} {'img/s':>7} "
        f"{'peak GB':>8} opt"
    )
    base = {}
    for targets, batch, cache, ckpt, sps, ips, peak, opt, buckets in rows:
        base.setdefault((targets, batch, ckpt), sps)
        ratio = sps / base[(targets, batch, ckpt)]
        peak_text = f"{peak:8.2f}" if peak is not None else "       -"
        print(
            f"{targets:>9} {batch:>5} {cache!s:>6} {ckpt!s:>5} {sps:>8.2f} {ips:>7.2f} "
            f"{peak_text} {opt} (x{ratio:.2f} vs no cache; buckets {buckets})"
        )


if __name__ == "__main__":
    main()
