"""Generation speed: fulora's generator vs a plain diffusers `pipe(prompt)` call per image.

The plain way is what the paper's AUTOMATIC1111 workflow does: one image per call at batch 1,
the prompt re-encoded every call. Both run in this process on the same model, with the same
sampler, steps, guidance and size; the ratio is images/s (ours) / images/s (plain).

CPU (default): the tiny in-code SD model, 80x48 px, 20 steps.
GPU: --model sd15-random builds SD1.5's architecture with random weights (speed does not
depend on the values), 512x512, 30 steps, CFG 7, fp16; several batch sizes; peak memory.
An H100's limit is about 15.8 images/s (~50.7 TFLOP per image at ~800 TFLOP/s dense fp16).

    python benchmarks/bench_generate.py                                  # CPU, tiny
    python benchmarks/bench_generate.py --model sd15-random --width 512 --height 512 \\
        --steps 30 --images 64 --batch-sizes 1 4 8 16 32                 # GPU
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from fulora.generate.run import GenerateConfig, generate
from fulora.generate.samplers import make_scheduler
from fulora.lora.base import load_pipeline
from fulora.lora.tiny import save_sd15_random, save_tiny_model

H100_IMAGES_PER_S = 15.8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    args = parser.parse_args()
    logging.getLogger("fulora").setLevel(logging.WARNING)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = (
            save_tiny_model(tmp / "model")
            if args.model == "tiny"
            else save_sd15_random(tmp / "model")
        )
        pipe = load_pipeline(str(model), dtype=dtype).to(device)
        pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        prompt = "a photo of fetal brain"
        kwargs = dict(
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            clip_skip=1,
        )
        pipe(prompt, **kwargs)  # warm-up
        sync()
        start = time.perf_counter()
        for i in range(args.images):
            pipe(prompt, generator=torch.Generator().manual_seed(i), **kwargs)
        sync()
        plain = args.images / (time.perf_counter() - start)
        del pipe
        rows = []
        for batch in args.batch_sizes:
            cfg = GenerateConfig(
                base=str(model),
                planes=["brain"],
                per_class=args.images,
                steps=args.steps,
                width=args.width,
                height=args.height,
                batch_size=batch,
                guidance=7.0,
                contact_sheet=0,
            )
            generate(
                tmp / f"warm-{batch}",
                GenerateConfig(**{**cfg.__dict__, "per_class": batch}),
                progress=False,
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = generate(tmp / f"run-{batch}", cfg, progress=False)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            rows.append((batch, result["this_run_images_per_s"], peak))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})"
    print(
        f"model {args.model}, {args.width}x{args.height}, {args.steps} steps, DPM++ 2M Karras, "
        f"CFG 7, {args.images} images, {name}, {str(dtype).removeprefix('torch.')}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"plain pipe(prompt), batch 1: {plain:.3f} images/s")
    for batch, rate, peak in rows:
        line = f"fulora generate, batch {batch:>3}: {rate:.3f} images/s = x{rate / plain:.2f}"
        if peak is not None:
            line += f", peak {peak:.2f} GiB"
            if args.model == "sd15-random" and (args.width, args.height, args.steps) == (
                512,
                512,
                30,
            ):
                line += f", {100 * rate / H100_IMAGES_PER_S:.0f}% of an H100's limit"
        print(line)


if __name__ == "__main__":
    main()
