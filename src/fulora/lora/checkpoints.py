"""A LoRA run's files: resumable checkpoints, the loss record and the final LoRA.

Checkpoints (LoRA, optimiser, scheduler, position) are written to a temporary folder and renamed,
so a crash never leaves a half-written checkpoint as the latest one; the final LoRA is saved
twice, in diffusers/PEFT layout and as a kohya/AUTOMATIC1111 ``.safetensors`` with the training
metadata in its header.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fulora import __version__
from fulora.config import to_dict
from fulora.figures import loss_curve
from fulora.io import write_json, write_text
from fulora.lora.formats import peft_state_dicts, save_lora_files

if TYPE_CHECKING:
    from fulora.lora.data import Example

logger = logging.getLogger("fulora")


def checkpoint_folders(out: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and (p / "state.json").is_file() and p.name.startswith("step-")
    )


def dataset_hash(examples: list[Example]) -> str:
    """A hash of the training images and captions (order-free), recorded with the LoRA."""
    digest = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.path):
        with open(e.path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
        digest.update(f"{e.label}\t{e.caption}\n".encode())
    return digest.hexdigest()


def read_loss(out: Path) -> list[dict[str, Any]]:
    """The run's loss record (``loss.csv``), one row per step; [] when there is none."""
    path = out / "loss.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [
            {
                "step": int(r["step"]),
                "epoch": int(r["epoch"]),
                "loss": float(r["loss"]),
                "lr": float(r["lr"]),
            }
            for r in csv.DictReader(handle)
        ]


def write_loss(out: Path, history: list[dict[str, Any]]) -> None:
    """``loss.csv`` and ``loss.png``, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "epoch", "loss", "lr"])
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "loss.csv", buffer.getvalue())
    if history:
        loss_curve(
            out / "loss.png",
            [r["step"] for r in history],
            [r["loss"] for r in history],
            title="LoRA training loss",
        )


def _lora_tensors(accelerator, unet, text_encoder, cfg) -> dict[str, torch.Tensor]:
    unet_sd, te_sd = peft_state_dicts(
        accelerator.unwrap_model(unet),
        accelerator.unwrap_model(text_encoder) if cfg.train_text_encoder else None,
    )
    tensors = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in unet_sd.items()}
    tensors.update(
        {f"text_encoder.{k}": v.detach().float().cpu().contiguous() for k, v in te_sd.items()}
    )
    return tensors


def save_checkpoint(
    out, step, accelerator, unet, text_encoder, optimizer, lr_scheduler, history, cfg
) -> None:
    """Write checkpoints/step-N atomically (temp folder, then rename); keep the newest few."""
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=folder))
    save_file(_lora_tensors(accelerator, unet, text_encoder, cfg), str(tmp / "lora.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    write_loss(out, history)
    write_json(tmp / "state.json", {"step": step, "config": to_dict(cfg)})  # written last
    final = folder / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_folders(out)[: -cfg.keep_checkpoints or None]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)


def tag_frequency(captions: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """The ``ss_tag_frequency`` kohya writes for (folder, caption) pairs, one pair per image.

    Per folder, how many captions hold each tag: a caption's comma-separated parts, stripped
    and lower-cased, empty ones left out (AUTOMATIC1111 shows them as the LoRA's tags).
    """
    counts: dict[str, Counter[str]] = {}
    for folder, caption in captions:
        tags = (tag.strip().lower() for tag in caption.split(","))
        counts.setdefault(folder, Counter()).update(tag for tag in tags if tag)
    return {folder: dict(tags) for folder, tags in counts.items()}


def save_final(
    out, cfg, unet, text_encoder, unet_lora, te_lora, steps, identity, data_hash, examples
) -> None:
    """The LoRA in both layouts, its kohya metadata recording data, base model and recipe."""
    captions = {}
    for e in examples:
        captions.setdefault(e.label, Counter())[e.caption] += 1
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_steps": str(steps),
        "ss_seed": str(cfg.seed),
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_enable_bucket": str(cfg.buckets and not cfg.center_crop),
        "ss_bucket_no_upscale": str(not cfg.bucket_upscale),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_sd_model_name": identity[0],
        "ss_new_sd_model_hash": identity[1],
        "ss_output_name": cfg.output_name,
        "ss_base_model_version": "sd_v1",
        "ss_learning_rate": str(cfg.unet_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr),
        "ss_num_train_images": str(len(examples)),
        "ss_tag_frequency": tag_frequency((e.label, e.caption) for e in examples),
        "fulora_version": __version__,
        "fulora_base_model": cfg.base,
        "fulora_base_model_sha256": identity[1],
        "fulora_dataset_sha256": data_hash,
        "fulora_captions": {plane: c.most_common(1)[0][0] for plane, c in captions.items()},
        "fulora_buckets": sorted({e.bucket_name for e in examples}),
        # the most common training bucket: generation's default size
        "fulora_size": "x".join(map(str, Counter(e.bucket for e in examples).most_common(1)[0][0])),
        "fulora_targets": cfg.targets,
        "fulora_config": to_dict(cfg),
    }
    save_lora_files(
        out,
        unet,
        text_encoder,
        unet_lora,
        te_lora,
        output_name=cfg.output_name,
        metadata=metadata,
        save_dtype=cfg.save_dtype,
    )
