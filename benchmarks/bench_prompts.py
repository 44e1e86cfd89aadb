"""What AUTOMATIC1111's prompt language costs in generation: each kind of prompt vs a plain one.

A plain prompt runs diffusers' own guidance (two UNet rows per image). An edited or alternated
prompt runs the same rows through hooks that pick each call's embeddings; an ``AND`` prompt
adds a UNet row per part. Every variant runs in this process on the same model, sampler,
steps, guidance and size; the ratio is images/s (variant) / images/s (plain), best of
``--repeats`` runs after a warm-up run, each timed by ``generate`` itself (model loading and
prompt encoding left out).

    python benchmarks/bench_prompts.py                       # CPU, fulora:phantom-sd
    python benchmarks/bench_prompts.py --lora demo-run/lora/r16/demo_lora.safetensors

With ``--lora``, two more rows: the LoRA's ``<lora:name:0.6>`` in the prompt (fused into the
weights, as when every plane has the same weights) against the same run unfused (the LoRA on
its adapter layers, as when planes' tags give it different weights).
    python benchmarks/bench_prompts.py --device cuda --base /models/sd15 --width 512 \\
        --height 512 --steps 30 --per-class 32
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
from pathlib import Path

import torch

from fulora.generate.run import GenerateConfig, generate

PROMPTS = {
    "plain": "a photo of fetal brain",
    "alternation of one text (hooks, same rows)": "a photo of fetal [brain|brain]",
    "edit at step 10": "a photo of fetal [head:brain:10]",
    "AND, 2 parts (3 rows)": "a photo of fetal brain AND skull :0.5",
    "AND, 3 parts (4 rows)": "a photo of fetal brain AND skull :0.5 AND head :0.3",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="fulora:phantom-sd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=16, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora", help="a LoRA file for the <lora:...> rows")
    args = parser.parse_args()
    logging.getLogger("fulora").setLevel(logging.WARNING)
    variants = {name: (prompt, {}) for name, prompt in PROMPTS.items()}
    if args.lora:
        tag = f"a photo of fetal brain <lora:{Path(args.lora).stem}:0.6>"
        variants["<lora:name:0.6>, fused (planes of one weight)"] = (tag, {})
        variants["<lora:name:0.6>, unfused (planes of other weights)"] = (tag, {"fuse_lora": False})
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (prompt, settings) in variants.items():
            folder = Path(tmp) / str(len(rates))
            rates[name] = _images_per_s(folder, prompt, args, **settings)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.device}, {args.base}, "
        f"{args.width}x{args.height}, {args.steps} steps, batch {args.batch_size}, "
        f"LoRA {args.lora or 'none'}"
    )
    print("| prompt | images/s | vs plain |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / rates['plain']:.2f}x |")


def _images_per_s(folder: Path, prompt: str, args, **settings) -> float:
    """The best images/s of ``--repeats`` fresh runs (each its own folder) after a warm-up:
    ``generate``'s own count and time of the images it made (the denoising and the writing)."""
    best = 0.0
    for run in range(args.repeats + 1):
        cfg = GenerateConfig(
            base=args.base,
            planes=["brain"],
            prompts={"brain": prompt},
            per_class=args.per_class,
            steps=args.steps,
            width=args.width,
            height=args.height,
            batch_size=args.batch_size,
            device=args.device,
            contact_sheet=0,
            sampler="euler",
            lora=args.lora,
            **settings,
        )
        record = generate(folder / str(run), cfg, progress=False)
        if run:  # the first run warms up; each run's own timing leaves out loading the model
            best = max(best, record["this_run_generated"] / record["this_run_seconds"])
    return best


if __name__ == "__main__":
    main()
