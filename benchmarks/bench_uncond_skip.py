"""What A1111's Skip Early CFG and NGMS save: images/s and UNet rows, with and without them.

Each setting generates the same images' count with ``fulora generate`` in this process, on
the same model, sampler (Euler), steps, guidance 7 and batch; the ratio is images/s with the
setting / images/s without it (every step guided). The rows are all the UNet's batch rows
(a guided step runs 2 per image, a skipped one 1).

CPU (default): fulora's shipped ``fulora:phantom-sd`` at its 64x48, 30 steps.
GPU: ``--model sd15-random --width 512 --height 512`` (SD1.5's architecture, random weights).

    python benchmarks/bench_uncond_skip.py
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
from pathlib import Path

import torch

from fulora.generate.run import GenerateConfig, generate
from fulora.lora.tiny import save_sd15_random
from fulora.shipped import PHANTOM_SD

SETTINGS = {
    "every step guided": {},
    "skip_early_cfg 0.2": {"skip_early_cfg": 0.2},
    "ngms 1": {"ngms": 1.0},
    "ngms 1, all steps": {"ngms": 1.0, "ngms_all_steps": True},
}


def _rows_and_rate(cfg: GenerateConfig, out: Path) -> tuple[int, float]:
    """All UNet batch rows of one ``generate`` run, and its images/s (model loading apart)."""
    from diffusers import UNet2DConditionModel

    rows = []

    def count(module, args, output):  # global: the call's own rows, before fulora's hooks
        if isinstance(module, UNet2DConditionModel):
            rows.append(output[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        record = generate(out, cfg, progress=False)
    finally:
        handle.remove()
    return sum(rows), record["this_run_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["phantom-sd", "sd15-random"], default="phantom-sd")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("fulora").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = PHANTOM_SD if args.model == "phantom-sd" else str(save_sd15_random(tmp / "m"))
        common = dict(
            base=base,
            planes=["brain"],
            per_class=args.images,
            batch_size=args.batch_size,
            sampler="Euler",
            steps=args.steps,
            guidance=7.0,
            width=args.width,
            height=args.height,
            negative_prompt="blurry",
            contact_sheet=0,
        )
        warm = GenerateConfig(**{**common, "per_class": args.batch_size})
        generate(tmp / "warm-up", warm, progress=False)
        results = {}
        for name, setting in SETTINGS.items():
            cfg = GenerateConfig(**common, **setting)
            results[name] = _rows_and_rate(cfg, tmp / name.replace(" ", "-").replace(",", ""))
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(
        f"{args.model}, {args.width}x{args.height}, Euler {args.steps} steps, CFG 7, "
        f"batch {args.batch_size}, {args.images} images; {device}, torch {torch.__version__}"
    )
    guided_rate = results["every step guided"][1]
    print("| setting | UNet rows | images/s | vs every step guided |")
    print("|---|---:|---:|---:|")
    for name, (rows, rate) in results.items():
        print(f"| {name} | {rows} | {rate:.2f} | {rate / guided_rate:.2f}x |")


if __name__ == "__main__":
    main()
