"""Saving the foundation model: the diffusers folder, its figures and its model card."""

from __future__ import annotations

import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fulora.config import to_dict
from fulora.figures import image_grid, loss_curve
from fulora.generate.samplers import make_scheduler
from fulora.io import file_hash, write_text
from fulora.lora.clip_layout import write_kohya_layout
from fulora.runs import DONE_NAME, LOG_NAME

CARD = "MODEL_CARD.md"
SAMPLE_CAPTIONS = (
    "an ultrasound image",
    "an ultrasound image, bright, coarse speckle",
    "an ultrasound image, dark, narrow sector",
    "an ultrasound image, wide sector, with text",
)


def save_model(out: Path, parts: dict, cfg, corpus, *, history, build_seconds) -> dict[str, Any]:
    """Write the fp16 diffusers folder, loss curves, a sample grid and ``MODEL_CARD.md``.

    Returns:
        Facts for ``done.json``: parameters, file sizes, final losses, seconds.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts)
    pipe.to(torch.float16).save_pretrained(out)
    write_kohya_layout(out / "text_encoder")  # readable by transformers 4 and 5
    pipe.to(torch.float32)
    for stage in ("vae", "unet"):
        rows = [r for r in history if r["stage"] == stage]
        loss_curve(
            out / f"loss_{stage}.png",
            [r["step"] for r in rows],
            [r["loss"] for r in rows],
            title=f"foundation model: {stage} loss",
        )
    sample_grid(out / "samples.png", pipe, seed=cfg.seed)
    params = {
        k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")
    }
    final = {
        stage: float(np.mean([r["loss"] for r in history if r["stage"] == stage][-100:]))
        for stage in ("vae", "unet")
    }
    record = {
        "parameters": params,
        "final_loss": {k: round(v, 5) for k, v in final.items()},
        "build_seconds": build_seconds,
        "machine": f"{platform.machine()}, {threads_note()}, torch {torch.__version__}",
        "scaling_factor": round(float(parts["vae"].config.scaling_factor), 5),
    }
    _write_card(out, cfg, corpus, record)
    return record


@torch.no_grad()
def sample_grid(path: Path, pipe, *, seed: int = 0, per_caption: int = 6, steps: int = 30) -> Path:
    """A grid of samples from generic captions: what the base model draws before any LoRA."""
    pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for k, caption in enumerate(SAMPLE_CAPTIONS):
        generators = [
            torch.Generator().manual_seed(seed * 1000 + k * 100 + i) for i in range(per_caption)
        ]
        images = pipe(
            [caption] * per_caption,
            height=48,
            width=64,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=generators,
            output_type="np",
        ).images
        rows.append([(img.mean(axis=2) * 255).round().astype(np.uint8) for img in images])
    labels = [
        c.removeprefix("an ultrasound image").strip(", ") or "(plain)" for c in SAMPLE_CAPTIONS
    ]
    return image_grid(
        path, rows, row_labels=labels, title='"an ultrasound image, ..." (no plane names)'
    )


def _write_card(out: Path, cfg, corpus, record: dict[str, Any]) -> None:

    commonest, count = Counter(corpus.captions).most_common(1)[0]
    files = sorted(
        p for p in out.rglob("*") if p.is_file() and "work" not in p.relative_to(out).parts
    )
    files = [p for p in files if p.name not in (CARD, LOG_NAME, DONE_NAME)]
    hashes = "\n".join(
        f"| `{p.relative_to(out)}` | {p.stat().st_size:,} | `{file_hash(p)}` |" for p in files
    )
    settings = "\n".join(f"| `{k}` | {v} |" for k, v in to_dict(cfg).items())
    params = record["parameters"]
    seconds = record["build_seconds"]
    write_text(
        out / CARD,
        f"""# fulora phantom-sd: a tiny foundation model made by fulora

A latent diffusion model with Stable Diffusion 1.5's classes and wiring (AutoencoderKL,
UNet2DConditionModel with cross-attention, CLIPTextModel + CLIP BPE tokenizer, DDPM noise
schedule of SD1.5), at 64x48 px, pretrained **by fulora from nothing** on unlabelled phantom
ultrasound. It stands in for SD1.5 where SD1.5 cannot be had (tests, the demo, CPU-only
machines); it knows ultrasound-like pictures in general and **no plane names**: those are for a
LoRA to learn. Load it as `fulora:phantom-sd` or by this folder's path in any fulora command,
or with plain `StableDiffusionPipeline.from_pretrained(<this folder>)`.

## How it was made

```bash
fulora foundation build --config configs/foundation.yaml --out <folder>
```

Corpus: {cfg.corpus_size:,} images, each a scan of one of the phantom's anatomies by its own
simulated machine (`fulora.foundation.corpus`: sector, depth, speckle, gain, dynamic range,
attenuation, noise, blur, on-screen text drawn per image), {cfg.width}x{cfg.height} px.
Captions say what a viewer sees, in plain visual words ("an oval ring", "a bright bar", "small
dark circles"; shapes shared across anatomies, each left out at random), and how the machine's
picture looks ("coarse speckle", "narrow sector"); {len(set(corpus.captions))} distinct
captions, the commonest, "{commonest}", on {count}. **No caption names a plane or an organ**;
why visual words and not only "an ultrasound image" is measured in `fulora.foundation.corpus`.

1. VAE: {cfg.vae_steps} steps at batch {cfg.vae_batch_size} (L1 + MSE + {cfg.vae_kl_weight:g}
   KL), {seconds["vae"]} s. Latent scaling factor {record["scaling_factor"]} (unit variance).
2. UNet + text encoder: {cfg.unet_steps} steps at batch {cfg.unet_batch_size}, epsilon
   objective, caption dropout {cfg.caption_dropout}, EMA {cfg.ema_decay}, {seconds["unet"]} s.

{seconds["vae"] + seconds["unet"]:.0f} s of training steps on {record["machine"]}
(resumed runs included). Parameters: UNet {params["unet"]:,}, VAE
{params["vae"]:,}, text encoder {params["text_encoder"]:,}; weights stored in fp16. Final
losses (mean of the last 100 steps): VAE {record["final_loss"]["vae"]}, UNet
{record["final_loss"]["unet"]}.

![VAE loss](loss_vae.png) ![UNet loss](loss_unet.png)

![samples from generic captions](samples.png)

## Recipe

| key | value |
|---|---|
{settings}

## Files

| file | bytes | sha256 |
|---|---:|---|
{hashes}
""",
    )


def threads_note() -> str:
    """How many threads torch uses (the card records it: CPU loss curves depend on it)."""
    return f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
