"""A generation run's files: each PNG with its provenance, the manifest, the contact sheets.

Each PNG carries its provenance twice: AUTOMATIC1111's ``parameters`` text (its PNG Info reads
it back, :func:`a1111_parameters`) and a ``fulora`` JSON chunk (:func:`read_png_provenance`),
from which :func:`build_manifest` makes the run's manifest, so every process's images count.
:class:`ImageWriter` writes a batch's PNGs on threads while the next batch denoises.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from fulora import __version__
from fulora.data.manifest import COLUMNS, MANIFEST_NAME, SYNTHETIC_COLUMNS, Manifest
from fulora.errors import DataError
from fulora.generate.config import HIRES_SETTINGS, HIRES_SIZES, GenerateConfig
from fulora.generate.decode import to_uint8
from fulora.generate.infotext import A1111_DEFAULT_RNG, A1111_RNG_NAMES
from fulora.generate.inversions import listed_name
from fulora.generate.networks import lora_tags
from fulora.generate.prompts import EMPHASIS_MODES
from fulora.generate.samplers import (
    chosen_schedule_type,
    display_name,
    schedule_type,
    scheduler_name,
)
from fulora.generate.schedules import read_prompt, schedule_steps
from fulora.io import atomic_path
from fulora.runs import now_iso, steady_rate


def image_path(out: Path, plane: str, index: int, seed: int) -> Path:
    """``OUT/<plane>/<index>-<seed>.png``: AUTOMATIC1111's naming, one folder per plane."""
    return out / plane / f"{index:05d}-{seed}.png"


# AUTOMATIC1111 takes these out of a LoRA's name in its "Lora hashes" (they separate entries).
_A1111_NAME_SYMBOLS = str.maketrans("", "", ":,")


def _a1111_value(value: Any) -> str:
    """A setting's value as AUTOMATIC1111 writes it.

    JSON-quoted if it holds a comma, colon or newline, which would otherwise end or split it
    when the text is read back.
    """
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(row: dict[str, Any], cfg: GenerateConfig, base_hash: str, resolved) -> str:
    """The ``parameters`` text AUTOMATIC1111 writes for such an image (its PNG Info reads it).

    The hashes are those AUTOMATIC1111 lists the files under: the base model file's sha256 (10
    digits) and the LoRA's :func:`~fulora.lora.formats.webui_lora_hash` (12 digits).

    Args:
        row: The image's provenance (:func:`save_image`'s row).
        cfg: The run's settings.
        base_hash: The base model's sha256 ("" when unknown: no ``Model hash``).
        resolved: The run's plan (``fulora.generate.run.plan``: the LoRA, its A1111 hash).
    """
    lora = resolved.lora
    settings: dict[str, Any] = {
        "Steps": cfg.steps,
        "Sampler": display_name(row["sampler"]),
        "Schedule type": schedule_type(row["sampler"], cfg.schedule_type),
        "CFG scale": f"{cfg.guidance:g}",
        "Seed": row["seed"],
        "Size": f"{resolved.width}x{resolved.height}",  # the first pass's, with the hires fix
    }
    if row["variation_seed"] is not None:  # A1111 writes them where the strength is not 0
        settings["Variation seed"] = row["variation_seed"]
        settings["Variation seed strength"] = f"{cfg.variation_strength:g}"
    settings["Seed resize from"] = row["seed_resize_from"] or None
    settings |= _a1111_hires(cfg)
    if base_hash:
        settings["Model hash"] = base_hash[:10]
    # A1111 names a checkpoint file by its stem (v1-5-pruned-emaonly), as it finds it again
    model = str(row["base_model"])
    settings["Model"] = Path(model).stem if model.endswith((".safetensors", ".ckpt")) else model
    if row["clip_skip"] > 1:
        settings["Clip skip"] = row["clip_skip"]
    # A1111 writes its ENSD where the sampler draws step noise (the config refuses it elsewhere)
    settings["ENSD"] = cfg.eta_noise_seed_delta or None
    settings["Eta"] = f"{cfg.eta_ancestral:g}" if cfg.eta_ancestral != 1 else None
    settings["Eta DDIM"] = f"{cfg.eta_ddim:g}" if cfg.eta_ddim else None
    settings |= _a1111_sigma_options(cfg) | _a1111_churn(cfg) | _a1111_unipc(cfg)
    # The noise source (fulora.generate.noise) by A1111's name; its default, GPU, is unwritten
    # (A1111 reads a missing RNG as GPU, and would start the CPU's images from other noise).
    settings["RNG"] = A1111_RNG_NAMES[cfg.rng] if cfg.rng != A1111_DEFAULT_RNG else None
    # A1111 writes these where a step ran without the negative prompt; fulora where set
    settings["Skip Early CFG"] = f"{cfg.skip_early_cfg:g}" if cfg.skip_early_cfg else None
    settings["NGMS"] = f"{cfg.ngms:g}" if cfg.ngms else None
    settings["NGMS all steps"] = True if cfg.ngms_all_steps else None
    if row.get("padded"):  # A1111 writes it where it padded a side
        settings["Pad conds v0" if cfg.pad_conds == "v0" else "Pad conds"] = True
    # A prompt's own <lora:...> applies the LoRA in A1111 as written; one without gets the
    # tag of lora_scale. A1111 lists the LoRA under the name the tag gives.
    tags = lora_tags(row["prompt"], "the prompt")
    text = row["prompt"]
    if lora is not None:
        name = tags[0].name if tags else lora.stem
        settings["Lora hashes"] = (
            f"{name.translate(_A1111_NAME_SYMBOLS)}: {resolved.lora_webui_hash[:12]}"
        )
        text += "" if tags else f" <lora:{lora.stem}:{cfg.lora_scale:g}>"
    # A1111 lists the embeddings its prompts used (textual_inversion_add_hashes_to_infotext)
    used = row.get("textual_inversions") or {}
    listed = [f"{listed_name(name)}: {sha[:12]}" for name, sha in used.items()]
    settings["TI hashes"] = ", ".join(listed) or None
    settings["Emphasis"] = _a1111_emphasis(row, cfg)
    settings["Old prompt editing timelines"] = _a1111_old_timelines(row, cfg)
    settings["Version"] = f"fulora {row['fulora_version']}"  # not a version A1111 acts on
    if row["negative_prompt"]:
        text += f"\nNegative prompt: {row['negative_prompt']}"
    written = {k: v for k, v in settings.items() if v is not None}
    return f"{text}\n" + ", ".join(f"{k}: {_a1111_value(v)}" for k, v in written.items())


def _a1111_sigma_options(cfg: GenerateConfig) -> dict[str, Any]:
    """A1111's fields of the sigma options it writes where set (Beta's shape with Beta)."""
    schedule = cfg.sigma_schedule()
    if schedule is None:
        return {}
    fields: dict[str, Any] = {}
    if schedule.kind == "beta":
        fields["Beta schedule alpha"] = f"{cfg.beta_schedule_alpha:g}"
        fields["Beta schedule beta"] = f"{cfg.beta_schedule_beta:g}"
    for name, value in (("min sigma", schedule.sigma_min), ("max sigma", schedule.sigma_max)):
        fields[f"Schedule {name}"] = f"{value:g}" if value else None
    fields["Schedule rho"] = f"{schedule.rho:g}" if schedule.rho else None
    # A1111 writes it where the option made a sampler drop a sigma it keeps (not DPM2's own)
    fields["Discard penultimate sigma"] = True if cfg.discard_penultimate_sigma else None
    fields["Downcast alphas_cumprod"] = True if cfg.downcast_alphas_cumprod else None
    fields["Noise Schedule"] = "Zero Terminal SNR" if cfg.zero_terminal_snr else None
    fields["SGM noise multiplier"] = True if cfg.sgm_noise_multiplier else None
    return fields


def _a1111_unipc(cfg: GenerateConfig) -> dict[str, Any]:
    """A1111's UniPC fields where not its defaults (as its versions before v1.6 wrote them)."""
    values = {"UniPC variant": (cfg.unipc_variant, "bh1")}
    values |= {"UniPC skip type": (cfg.unipc_skip_type, "time_uniform")}
    values |= {"UniPC order": (cfg.unipc_order, 3)}
    values |= {"UniPC lower order final": (cfg.unipc_lower_order_final, True)}
    return {name: v if v != default else None for name, (v, default) in values.items()}


def _a1111_hires(cfg: GenerateConfig) -> dict[str, Any]:
    """A1111's hires fix fields (its "Size" stays the first pass's); none when it is off."""
    if not cfg.hires_fix:
        return {}
    fields: dict[str, Any] = {"Denoising strength": f"{cfg.denoising_strength:g}"}
    if any(cfg.hires_resize):
        fields["Hires resize"] = f"{cfg.hires_resize_width}x{cfg.hires_resize_height}"
    else:
        fields["Hires upscale"] = f"{cfg.hires_scale:g}"
    fields["Hires steps"] = cfg.hires_steps or None  # A1111 writes them where not 0
    return fields | {"Hires upscaler": cfg.hires_upscaler}


def _a1111_churn(cfg: GenerateConfig) -> dict[str, Any]:
    """A1111's churn fields where not its defaults (as its ``Sampler.initialize`` writes them)."""
    values = {"Sigma churn": (cfg.sigma_churn, 0), "Sigma tmin": (cfg.sigma_tmin, 0)}
    values |= {"Sigma tmax": (cfg.sigma_tmax, 0), "Sigma noise": (cfg.sigma_noise, 1)}
    return {name: f"{v:g}" if v != default else None for name, (v, default) in values.items()}


def _a1111_emphasis(row: dict[str, Any], cfg: GenerateConfig) -> str | None:
    """A1111's "Emphasis" field, where A1111 writes one.

    Its mode, where it is not the default and a text that A1111 encodes (each step's text of
    the prompt and of the negative prompt) holds a bracket (A1111's ``sd_hijack_clip``).
    """
    if cfg.emphasis == "original":
        return None
    texts = [text for side in _sides(row, cfg) for text in side.texts]
    return EMPHASIS_MODES[cfg.emphasis] if any("(" in t or "[" in t for t in texts) else None


def _sides(row: dict[str, Any], cfg: GenerateConfig, old_timelines: bool | None = None):
    """The prompt's parts and the negative prompt's, scheduled as the run scheduled them."""
    steps = schedule_steps(row["sampler"], cfg.steps)
    old = cfg.old_prompt_editing if old_timelines is None else old_timelines
    prompt = read_prompt(row["prompt"], steps, old_timelines=old)
    return prompt + read_prompt(row["negative_prompt"], steps, negative=True, old_timelines=old)


def _a1111_old_timelines(row: dict[str, Any], cfg: GenerateConfig) -> bool | None:
    """A1111's "Old prompt editing timelines": set, and the schedules differ from the new rule's."""
    if not cfg.old_prompt_editing:
        return None
    schedules = [[side.schedule for side in _sides(row, cfg, old)] for old in (False, True)]
    return True if schedules[0] != schedules[1] else None


def _resize_from(cfg: GenerateConfig) -> str:
    """A1111's "Seed resize from", width x height ("" when off)."""
    if cfg.seed_resize_from_width is None:
        return ""
    return f"{cfg.seed_resize_from_width}x{cfg.seed_resize_from_height}"


def queue_writes(writer, made, out, plane, indices, seeds, targets, cfg, resolved, images) -> None:
    """Hand one decoded batch's wanted images to the PNG writer."""
    jobs = [
        partial(save_image, out, plane, index, seed, array, cfg, resolved, made)
        for index, seed, array in zip(indices, seeds, images, strict=True)
        if (plane, index) in targets
    ]
    writer.write(jobs)
    if made.first_batch is None:  # compilation, autotuning and allocation happen here
        made.first_batch = (len(jobs), time.perf_counter())


@dataclass
class Made:
    """What a process generated, and when (for images/s)."""

    base_name: str
    base_hash: str
    batch: int
    device: torch.device
    dtype: torch.dtype
    generated: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_batch: tuple[int, float] | None = None  # (images, time) when the first batch was done
    padded: dict[str, bool] = field(default_factory=dict)  # plane -> its sides padded (pad_conds)
    # plane -> the textual-inversion embeddings its prompts used: name -> the file's SHA-256
    inversions: dict[str, dict[str, str]] = field(default_factory=dict)

    def summary(self, processes: int) -> dict[str, Any]:
        """The share of this process: images, seconds, images/s (all; after the first batch)."""
        ended = time.perf_counter()
        seconds = ended - self.started
        return {
            "generated": self.generated,
            "seconds": round(seconds, 2),
            "images_per_s": round(self.generated / seconds, 3)
            if self.generated and seconds
            else None,
            "first_batch_s": round(self.first_batch[1] - self.started, 2)
            if self.first_batch
            else None,
            "steady_images_per_s": steady_rate(self.first_batch, self.generated, ended),
            "batch_size": self.batch,
            "device": str(self.device),
            "processes": processes,
        }


def save_image(out, plane, index, seed, array, cfg, resolved, made: Made) -> None:
    """One PNG, atomically, with its provenance (A1111 ``parameters`` + a ``fulora`` chunk)."""
    row = {
        "path": f"{plane}/{index:05d}-{seed}.png",
        "label": plane,
        "split": "train",
        "source": "synthetic",
        "domain": "synthetic",
        "patient": "",
        "prompt": resolved.prompts[plane],
        "negative_prompt": resolved.negative_prompt,
        "seed": seed,
        "sampler": resolved.sampler,
        "scheduler": scheduler_name(resolved.sampler),
        "clip_skip": resolved.clip_skip,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "width": array.shape[1],  # the image's (the hires pass's, with the hires fix)
        "height": array.shape[0],
        "lora": str(resolved.lora.resolve()) if resolved.lora else "",
        "lora_sha256": resolved.lora_sha256,
        "embeddings_sha256": resolved.embeddings_sha256,
        # the UNet's multiplier; a prompt's <lora:name:te:unet> holds the text encoder's
        "lora_scale": resolved.lora_weights[plane][1] if resolved.lora else cfg.lora_scale,
        "base_model": made.base_name,
        "created": now_iso(),
        "index": index,
        "run_seed": cfg.seed,
        "rng": cfg.rng,
        "eta_noise_seed_delta": cfg.eta_noise_seed_delta,
        "eta_ancestral": cfg.eta_ancestral,
        "eta_ddim": cfg.eta_ddim,
        # the schedule type the sampler stepped on (automatic: its own)
        "schedule_type": chosen_schedule_type(resolved.sampler, cfg.schedule_type) or "automatic",
        "schedule_sigma_min": cfg.schedule_sigma_min,
        "schedule_sigma_max": cfg.schedule_sigma_max,
        "schedule_rho": cfg.schedule_rho,
        "discard_penultimate_sigma": cfg.discard_penultimate_sigma,
        "downcast_alphas_cumprod": cfg.downcast_alphas_cumprod,
        "zero_terminal_snr": cfg.zero_terminal_snr,
        "sgm_noise_multiplier": cfg.sgm_noise_multiplier,
        "sigma_churn": cfg.sigma_churn,
        "sigma_tmin": cfg.sigma_tmin,
        "sigma_tmax": cfg.sigma_tmax,
        "sigma_noise": cfg.sigma_noise,
        "unipc_variant": cfg.unipc_variant,
        "unipc_skip_type": cfg.unipc_skip_type,
        "unipc_order": cfg.unipc_order,
        "unipc_lower_order_final": cfg.unipc_lower_order_final,
        "unipc_legacy_steps": cfg.unipc_legacy_steps,
        # A1111's hires fix (hires_scale None and no resize: off)
        **{key: getattr(cfg, key) for key in (*HIRES_SIZES, *HIRES_SETTINGS)},
        "skip_early_cfg": cfg.skip_early_cfg,
        "ngms": cfg.ngms,
        "ngms_all_steps": cfg.ngms_all_steps,
        # A1111's "Pad prompt/negative prompt", and whether it padded this plane's sides
        "pad_conds": cfg.pad_conds,
        "old_prompt_editing": cfg.old_prompt_editing,
        "padded": made.padded.get(plane, False),
        "textual_inversions": made.inversions.get(plane, {}),
        "variation_seed": cfg.variation_seed_of(index),
        "variation_strength": cfg.variation_strength,
        "seed_resize_from": _resize_from(cfg),
        "emphasis": cfg.emphasis,
        "pixel_rounding": cfg.pixel_rounding,
        "batch_size": made.batch,
        "device": made.device.type,
        "dtype": str(made.dtype).removeprefix("torch."),
        "fulora_version": __version__,
    }
    img = Image.fromarray(to_uint8(array, cfg.pixel_rounding), "RGB")
    if cfg.color == "L":
        img = img.convert("L")
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(row, cfg, made.base_hash, resolved))
    info.add_text("fulora", json.dumps(row))
    with atomic_path(image_path(out, plane, index, seed)) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


class ImageWriter:
    """Writes one batch's PNGs on threads while the next batch denoises (0 threads: at once).

    PNG encoding and the fsync of each file are CPU work that would otherwise leave the GPU idle
    between batches. At most one batch waits to be written (memory stays bounded), a failed write
    raises at the next batch, and leaving the block waits for every queued image, so work that
    was denoised is on disk even when the run stops with an error.
    """

    def __init__(self, threads: int, made: Made, bar) -> None:
        self.made, self.bar = made, bar
        self.pool = ThreadPoolExecutor(threads, "fulora-png") if threads else None
        self.pending: list[Future] = []

    def write(self, jobs: list[Callable[[], None]]) -> None:
        """Queue one batch's image writes, once the previous batch's are on disk."""
        self.drain()
        if self.pool is None:
            for job in jobs:
                job()
                self._count()
        else:
            self.pending = [self.pool.submit(job) for job in jobs]

    def drain(self) -> None:
        """Wait for the queued writes; the first failure raises."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()
            self._count()

    def _count(self) -> None:
        self.made.generated += 1
        self.bar.update(1)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.pool is None:
            return
        if kind is None:
            self.drain()
        self.pool.shutdown(wait=True)  # on an error too: what was denoised reaches the disk


def read_png_provenance(path: str | Path) -> dict[str, Any]:
    """The ``fulora`` JSON chunk of a generated PNG.

    Raises:
        DataError: If the file is not a fulora image or cannot be read.
    """
    try:
        with Image.open(path) as img:
            text = img.text.get("fulora")  # type: ignore[attr-defined]
    except (OSError, AttributeError) as err:
        raise DataError(f"cannot read provenance of {path}: {err}") from None
    if not text:
        raise DataError(f"{path} has no fulora provenance chunk")
    return json.loads(text)


def build_manifest(
    out: Path, planes: Sequence[str], per_class: int, seeds: dict[tuple[str, int], int]
) -> Manifest:
    """The run's manifest, from the provenance each PNG carries (so every process's work counts)."""
    records = []
    for plane in planes:
        for index in range(per_class):
            path = image_path(out, plane, index, seeds[(plane, index)])
            if not path.is_file():
                raise DataError(f"image {path} is missing; run the same command again to finish")
            row = read_png_provenance(path)
            row["path"] = str(path.resolve())
            records.append(row)
    ordered = list(COLUMNS) + list(SYNTHETIC_COLUMNS)
    manifest = Manifest.from_records(records, origin=str(out / MANIFEST_NAME))
    extras = [c for c in manifest.frame.columns if c not in ordered]
    manifest.frame = manifest.frame[ordered + extras]
    return manifest


def contact_sheet(
    path: Path, images: Sequence[Path], *, side: int = 8, title: str = "", thumb: int = 96
) -> Path:
    """A ``side`` x ``side`` grid of thumbnails, as one PNG."""
    chosen = list(images)[: side * side]
    rows = math.ceil(len(chosen) / side) if chosen else 1
    sheet = Image.new("L", (side * thumb, rows * thumb + (16 if title else 0)), 0)
    for k, image_file in enumerate(chosen):
        with Image.open(image_file) as img:
            img = img.convert("L")
            img.thumbnail((thumb, thumb))
            x, y = (k % side) * thumb, (k // side) * thumb + (16 if title else 0)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
    if title:
        ImageDraw.Draw(sheet).text((4, 2), title[:120], fill=230)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
