"""Shared by the foundation tests."""

from __future__ import annotations

from pathlib import Path

import torch


def plain_diffusers_image(folder: Path):
    """Load ``folder`` with plain diffusers (no fulora code) and draw one 64x48 image.

    Returns:
        (the pipeline, the image as an (48, 64, 3) float array).
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    image = pipe(
        "an ultrasound image",
        height=48,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    return pipe, image
