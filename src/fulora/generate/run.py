"""``fulora generate``: a LoRA and a base model into thousands of labelled synthetic images.

Every image is reproducible on its own: its seed is a function of (run seed, plane, index), its
initial noise is drawn on the CPU from that seed (so it does not depend on the GPU), and it is
always computed in the same batch: batch ``k`` of a plane holds indices ``[k*B, (k+1)*B)``.
Hence a resumed run, ``--only PLANE:INDEX`` and a run split over several processes produce the
same bytes as one uninterrupted run on the same device and dtype. Changing the batch size
changes the floating-point summation order inside the UNet's matrix products, which can move a
few pixels by one grey level; nothing else changes.

Each PNG carries its provenance in AUTOMATIC1111's ``parameters`` text chunk and in a
``fulora`` JSON chunk; ``manifest.csv`` has one row per image (prompt, negative prompt, seed,
sampler, steps, guidance, size, LoRA file and hash, LoRA scale, base model, time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from fulora import __version__
from fulora.config import check_process_device, require_device, resolve_device
from fulora.data.manifest import COLUMNS, MANIFEST_NAME, SYNTHETIC_COLUMNS, Manifest
from fulora.errors import ConfigError, DataError
from fulora.generate.config import GenerateConfig
from fulora.generate.guidance import cross_attention_mask, padded_sides
from fulora.generate.prompts import a1111_chunks, check_prompt_syntax
from fulora.generate.samplers import (
    display_name,
    make_scheduler,
    resolve_sampler,
    schedule_type,
    scheduler_name,
)
from fulora.io import atomic_path, file_hash, half_written
from fulora.lora.base import (
    base_identity,
    check_base,
    load_pipeline,
    native_size,
)
from fulora.lora.conditioning import chunked_embeddings
from fulora.lora.formats import load_lora_into, read_lora, webui_lora_hash
from fulora.planes import PAPER_CAPTIONS, check_planes
from fulora.runs import CONFIG_NAME, DONE_NAME, RunDir, check_finite_weights, now_iso, steady_rate

logger = logging.getLogger("fulora")


# settings that change how fast images are written, never their bytes: a run may resume with
# another value (and an older run folder's config.yaml may not have the key at all)
_SPEED_ONLY = {"write_threads", "decode_overlap"}


def image_seed(run_seed: int, plane: str, index: int) -> int:
    """The 32-bit seed of image ``index`` of ``plane`` in a run seeded ``run_seed``."""
    digest = hashlib.sha256(f"fulora:{run_seed}:{plane}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def image_path(out: Path, plane: str, index: int, seed: int) -> Path:
    """``OUT/<plane>/<index>-<seed>.png``: AUTOMATIC1111's naming, one folder per plane."""
    return out / plane / f"{index:05d}-{seed}.png"


def parse_only(items: Sequence[str], planes: Sequence[str]) -> list[tuple[str, int]]:
    """``["brain:3", ...]`` into (plane, index) pairs, checked against the run's planes."""
    out = []
    for item in items:
        plane, _, index = item.partition(":")
        if not index.isdigit():
            raise ConfigError(f"--only {item!r}: expected PLANE:INDEX such as brain:12")
        canonical = check_planes([plane])[0]
        if canonical not in planes:
            raise ConfigError(f"--only {item!r}: {canonical} is not one of the planes {planes}")
        out.append((canonical, int(index)))
    return out


def _resolve_lora(lora: str | None) -> Path | None:
    """The LoRA file of ``lora``: a file, a finished LoRA run folder, or a diffusers folder.

    Raises:
        DataError: For a missing path, or a run folder whose training has not finished (its
            files, if any, are an earlier run's: once generated with as if they were this one).
    """
    if lora is None:
        return None
    path = Path(lora)
    if path.is_dir() and (path / CONFIG_NAME).is_file() and not (path / DONE_NAME).is_file():
        raise DataError(
            f"the LoRA training in {path} has not finished (no {DONE_NAME}): finish it with its "
            "`fulora lora train ... --resume` command, or pass one of its .safetensors files "
            "to use it as it is"
        )
    if path.is_dir() and (path / DONE_NAME).is_file():
        done = json.loads((path / DONE_NAME).read_text())
        # the file of that name in this folder: a copied folder's done.json names the
        # original's path, which may hold another LoRA by now
        named = path / Path(done.get("lora_kohya") or "").name
        if done.get("lora_kohya") and named.is_file():
            return named
        # [!.]: not the .<name>.tmp.safetensors of an export killed in an earlier attempt
        kohya = sorted(
            p
            for p in path.glob("[!.]*.safetensors")
            if p.name != "pytorch_lora_weights.safetensors"
        )
        if kohya:
            return kohya[0]
    if not path.exists():
        raise DataError(f"LoRA {path} does not exist")
    return path


@dataclass
class _Plan:
    """What a run will produce, resolved before any model is loaded."""

    planes: list[str]
    prompts: dict[str, str]
    width: int
    height: int
    lora: Path | None
    lora_sha256: str
    batch_size: int
    lora_webui_hash: str = ""  # what AUTOMATIC1111 lists the LoRA under (webui_lora_hash)
    clip_skip: int = 1
    sampler: str = "dpmpp_2m_karras"  # fulora's canonical name


def plan(cfg: GenerateConfig) -> _Plan:
    """Resolve prompts, size, LoRA and batch size from the config and the LoRA's metadata."""
    planes = check_planes(cfg.planes)
    lora = _resolve_lora(cfg.lora)
    metadata: dict[str, str] = {}
    webui_hash = ""
    if lora is not None:
        found = read_lora(lora)
        webui_hash = webui_lora_hash(found.path, found.metadata)
        check_finite_weights(
            found.tensors.items(),
            f"the LoRA {found.path}",
            "Every image made with it would be NaN, decoded as black: use another LoRA, or "
            "retrain it with lower learning rates (--unet-lr, --text-encoder-lr).",
        )
        metadata = found.metadata
    captions = json.loads(metadata.get("fulora_captions", "{}") or "{}")
    given = dict(zip(check_planes(cfg.prompts), cfg.prompts.values(), strict=True))
    prompts = {
        plane: given.get(plane) or captions.get(plane) or PAPER_CAPTIONS[plane] for plane in planes
    }
    for plane in sorted(set(captions) & set(planes) - set(given)):  # given: checked in the config
        what = f"the LoRA's caption for {plane} (give prompts.{plane})"
        check_prompt_syntax(prompts[plane], what)
    width, height = cfg.width, cfg.height
    if width is None or height is None:
        # the LoRA's commonest training bucket, else the base model's own size, else SD1.5's
        size = metadata.get("fulora_size", "")
        if "x" in size:
            w, h = (int(v) for v in size.split("x"))
        else:
            w, h = native_size(cfg.base) or (512, 512)
        width, height = width or w, height or h
    if width % 8 or height % 8:
        raise ConfigError(f"width and height must be multiples of 8, got {width}x{height}")
    return _Plan(
        planes,
        prompts,
        width,
        height,
        lora,
        file_hash(lora) if lora is not None and lora.is_file() else "",
        cfg.batch_size or 0,
        clip_skip=_clip_skip(cfg.clip_skip, metadata, lora),
        sampler=resolve_sampler(cfg.sampler),
        lora_webui_hash=webui_hash,
    )


def _clip_skip(given: int | None, metadata: dict[str, str], lora: Path | None) -> int:
    """The user's clip skip, else the one the LoRA was trained with (``ss_clip_skip``), else 1."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"clip_skip must be 1 (CLIP's last layer) or more, got {given}")
        return given
    trained = str(metadata.get("ss_clip_skip", "")).strip()
    if trained.isdigit() and int(trained) >= 1:
        logger.info("clip skip %s, as LoRA %s was trained", trained, lora)
        return int(trained)
    return 1


def apply_speedups(pipe, cfg: GenerateConfig, device: torch.device) -> None:
    """Switch on the speed options of ``cfg`` on a pipeline already on ``device``.

    Each is an option so that ``benchmarks/gpu_suite.py`` can measure its gain: fused QKV
    projections (one matrix product for q, k and v), channels-last UNet and VAE (faster
    convolutions on tensor cores), VAE slicing/tiling (memory), ``torch.compile`` of the UNet and
    the VAE decoder. None changes the images beyond floating-point rounding (tested on CPU).
    """
    if cfg.fuse_qkv:
        pipe.fuse_qkv_projections()  # after any LoRA is fused: q, k, v are concatenated
    if cfg.channels_last and device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.compile:
        # fixed shapes (one batch size, one image size): no recompilation after the first batch
        options = compile_options(cfg)
        pipe.unet = torch.compile(pipe.unet, options=options)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, options=options)


# PyTorch's "diffusion-fast" inductor settings (also in diffusers' torch.compile guide)
_INDUCTOR_TUNING = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


def compile_options(cfg: GenerateConfig) -> dict[str, bool]:
    """The inductor options of ``cfg``'s compile mode plus, if asked, the diffusion-fast ones.

    ``torch.compile`` takes a mode or options, not both, so the mode goes in as its options.
    """
    # torch loads its compiler on first use of the attribute (1.7 s): only runs that compile pay
    options = dict(torch._inductor.list_mode_options(cfg.compile_mode))
    if cfg.inductor_tuning:
        options.update(_INDUCTOR_TUNING)
    return options


def _auto_batch(device: torch.device, width: int, height: int) -> int:
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    # ~0.6 GB per 512x512 image in fp16 with SDPA (UNet activations under CFG), 4 GB headroom
    per_image = 0.6 * (width * height) / (512 * 512)
    return int(max(1, min(32, (free / 2**30 - 4.0) / per_image)))


# AUTOMATIC1111 takes these out of a LoRA's name in its "Lora hashes" (they separate entries).
_A1111_NAME_SYMBOLS = str.maketrans("", "", ":,")


def _a1111_value(value: Any) -> str:
    """A setting's value as AUTOMATIC1111 writes it.

    JSON-quoted if it holds a comma, colon or newline, which would otherwise end or split it
    when the text is read back.
    """
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _a1111_parameters(
    row: dict[str, Any], cfg: GenerateConfig, base_hash: str, resolved: _Plan
) -> str:
    """The ``parameters`` text AUTOMATIC1111 writes for such an image (its PNG Info reads it).

    The hashes are those AUTOMATIC1111 lists the files under: the base model file's sha256 (10
    digits) and the LoRA's :func:`~fulora.lora.formats.webui_lora_hash` (12 digits).
    """
    lora = resolved.lora
    settings: dict[str, Any] = {
        "Steps": cfg.steps,
        "Sampler": display_name(row["sampler"]),
        "Schedule type": schedule_type(row["sampler"]),
        "CFG scale": f"{cfg.guidance:g}",
        "Seed": row["seed"],
        "Size": f"{row['width']}x{row['height']}",
    }
    if base_hash:
        settings["Model hash"] = base_hash[:10]
    # A1111 names a checkpoint file by its stem (v1-5-pruned-emaonly), as it finds it again
    model = str(row["base_model"])
    settings["Model"] = Path(model).stem if model.endswith((".safetensors", ".ckpt")) else model
    if row["clip_skip"] > 1:
        settings["Clip skip"] = row["clip_skip"]
    # The initial noise is drawn on the CPU (initial_noise), as A1111 draws it with RNG "CPU";
    # A1111 reads a missing RNG as its default, "GPU", and would start from other noise.
    settings["RNG"] = "CPU"
    if lora is not None:
        name = lora.stem.translate(_A1111_NAME_SYMBOLS)
        settings["Lora hashes"] = f"{name}: {resolved.lora_webui_hash[:12]}"
    settings["Version"] = f"fulora {row['fulora_version']}"  # not a version A1111 acts on
    text = row["prompt"] + (f" <lora:{lora.stem}:{cfg.lora_scale:g}>" if lora is not None else "")
    if row["negative_prompt"]:
        text += f"\nNegative prompt: {row['negative_prompt']}"
    written = {k: v for k, v in settings.items() if v is not None}
    return f"{text}\n" + ", ".join(f"{k}: {_a1111_value(v)}" for k, v in written.items())


def generate(
    out: str | Path,
    cfg: GenerateConfig,
    *,
    only: Sequence[str] = (),
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Generate ``cfg.per_class`` images per plane into ``out`` (resuming a partial run).

    Args:
        out: Output folder (a run folder).
        cfg: The configuration.
        only: ``PLANE:INDEX`` items to (re)generate alone, bit-identical to the full run's.
        progress: Show a progress bar.
        shard: ``(k, n)``: make only the k-th of n interleaved shares of the fixed batches,
            with no lock, manifest or ``done.json``, so that n processes (Ray tasks of
            ``fulora experiment run --executor ray``) share one folder; a plain call afterwards
            finds every image made and writes the manifest. Images are those of a one-process run.

    Returns:
        A summary (``done.json`` for a full run).

    Raises:
        ConfigError: For a folder holding a run with another configuration, an unknown
            sampler or plane, or a base model that cannot be had.
    """
    from accelerate import PartialState

    out = Path(out)
    resolved = plan(cfg)
    # before the folder gets a config.yaml, which would refuse the corrected command
    check_base(cfg.base, cfg.base_config)
    folder = RunDir(out)
    changed = [k for k in folder.changed_config_keys(cfg) or () if k not in _SPEED_ONLY]
    made_with = _images_made_with(folder, resolved.planes)
    if made_with and _sampler_that_made(made_with) == resolved.sampler and "sampler" in changed:
        changed.remove("sampler")  # another name of the same sampler ("DDIM (diffusers)")
    if changed and not only:
        raise ConfigError(
            f"{out} already holds images made with another configuration "
            f"({', '.join(changed)} differ); use another --out folder"
        )
    _check_same_making(out, resolved, made_with)
    require_device(cfg.device)
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    check_process_device(cfg.device, state.num_processes)
    # one process: the setting (accelerate's state may hold an earlier run's device); several
    # (accelerate launch): each process's own GPU
    device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.dtype, torch.float16 if device.type == "cuda" else torch.float32
    )
    batch = resolved.batch_size or _auto_batch(device, resolved.width, resolved.height)
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard {shard}: expected (k, n) with 0 <= k < n")
    index, count = shard or (state.process_index, state.num_processes)
    part = _Share(index, count, state if shard is None else None)
    run = RunDir(out, command="fulora generate")
    if part.main:
        run.lock() if only else run.start(cfg)  # one writer, even for --only
    try:
        return _generate_into(run, cfg, resolved, part, device, dtype, batch, only, progress)
    finally:
        run.close()


def _check_same_making(out: Path, resolved: _Plan, made_with: dict[str, Any] | None) -> None:
    """Images already in ``out`` come from this very LoRA file and sampler.

    The LoRA's path may hold another file now (a LoRA trained again into the same folder): a
    rerun mixed the two sets, or, finished, recorded the new file for the old images. A sampler
    name may have changed meaning (``DDIM`` and ``DPM++ 2M Karras`` were diffusers' until
    session 24).

    Raises:
        ConfigError: Naming both files' hashes, or both samplers and how to finish the run.
    """
    if made_with is None:
        return
    lora = made_with.get("lora_sha256", "")
    if lora != resolved.lora_sha256:
        raise ConfigError(
            f"{out} holds images made with another LoRA file (SHA-256 {lora[:12] or 'none'}"
            f"; {resolved.lora or 'no LoRA'} is {resolved.lora_sha256[:12] or 'none'}): use "
            "another --out folder"
        )
    sampler = _sampler_that_made(made_with)
    if sampler not in (None, resolved.sampler):
        raise ConfigError(
            f"{out} holds images made with the sampler {display_name(sampler)!r}, and this run's "
            f"is {display_name(resolved.sampler)!r}: finish them with --sampler {sampler} "
            f"(in an experiment, generate.settings.sampler: {sampler}), or use another --out "
            "folder"
        )


# Samplers that were diffusers' own schedulers until session 24 and are A1111's now; the
# records of that time name no scheduler, and their images are the "_diffusers" samplers'.
_DIFFUSERS_UNTIL_SESSION_24 = {
    name: f"{name}_diffusers" for name in ("ddim", "dpmpp_2m", "dpmpp_2m_karras")
}


def sampler_of_run(out: str | Path) -> str | None:
    """The sampler (its present name) that made a finished run's images; None: not finished."""
    done = RunDir(out).read_done()
    return _sampler_that_made(done) if done is not None else None


def _sampler_that_made(record: dict[str, Any]) -> str | None:
    """The present name of the sampler that a PNG's or ``done.json``'s record names (if any)."""
    if "sampler" not in record:  # a folder another command finished
        return None
    named = resolve_sampler(record["sampler"])
    if "scheduler" not in record:
        return _DIFFUSERS_UNTIL_SESSION_24.get(named, named)
    return named


def _images_made_with(folder: RunDir, planes: Sequence[str]) -> dict[str, Any] | None:
    """What made the images in ``folder``: ``done.json``, else a PNG's record (None: none)."""
    done = folder.read_done()
    if done is not None:
        return done
    for plane in planes:
        for png in sorted((folder / plane).glob("[!.]*.png"))[:1]:  # [!.]: not a write under way
            return read_png_provenance(png)
    return None


@dataclass(frozen=True)
class _Share:
    """The share of the batches a process makes: the ``index``-th of ``count``."""

    index: int
    count: int
    processes: Any  # accelerate's PartialState; None for a shard, which writes no outputs

    @property
    def main(self) -> bool:
        """Whether this process writes the manifest, contact sheets and ``done.json``."""
        return self.processes is not None and self.processes.is_main_process


def _generate_into(run, cfg, resolved, part: _Share, device, dtype, batch, only, progress) -> dict:
    """The body of :func:`generate` once the folder is locked: images, manifest, done.json."""
    out, main = run.path, part.main
    if main and part.count == 1:  # alone in the folder: no other process is mid-write
        _remove_half_written(out, resolved.planes)
    batches, seeds, targets = _work(cfg, resolved, batch, only, out)
    # The share is cut from the full list of batches, not from what is left, so that processes
    # that start at different times (Ray shards, a resumed run) never skip or repeat a batch.
    mine = [
        (plane, indices)
        for plane, indices in batches[part.index :: part.count]
        if any((plane, i) in targets for i in indices)
    ]
    base_name, base_hash = base_identity(cfg.base)
    made = _Made(base_name=base_name, base_hash=base_hash, batch=batch, device=device, dtype=dtype)
    if mine:
        pipe, embeddings = _load_generator(cfg, resolved, device, dtype)
        made.started = time.perf_counter()  # images/s measures generation, not model loading
        bar = tqdm(
            total=sum(sum((p, i) in targets for i in idx) for p, idx in mine),
            desc=f"generating ({part.index + 1}/{part.count})",
            unit="img",
            disable=not progress,
        )
        with (
            _ImageWriter(cfg.write_threads, made, bar) as writer,
            _Decoder(pipe, device, cfg.decode_overlap) as decoder,
        ):
            for plane, indices in mine:
                plane_seeds = [seeds[(plane, i)] for i in indices]
                latents = _denoise(pipe, embeddings[plane], plane_seeds, cfg, resolved)
                write = (writer, made, out, plane, indices, plane_seeds, targets, cfg, resolved)
                decoder.decode(latents, plane_seeds, then=partial(_queue_writes, *write))
        bar.close()
    summary = made.summary(part.count)
    if part.processes is not None:
        part.processes.wait_for_everyone()
    if only or not main:
        return summary
    manifest = build_manifest(out, resolved.planes, cfg.per_class, seeds)
    manifest.write(out / MANIFEST_NAME)
    if cfg.contact_sheet:
        for plane in resolved.planes:
            contact_sheet(
                out / f"contact_{plane}.png",
                manifest.select(labels=[plane]).paths,
                side=cfg.contact_sheet,
                title=f"{plane}: {resolved.prompts[plane]}",
            )
    record = run.finish(
        images=len(manifest),
        per_plane=manifest.counts("label"),
        prompts=resolved.prompts,
        size=f"{resolved.width}x{resolved.height}",
        lora=str(resolved.lora or ""),
        lora_sha256=resolved.lora_sha256,
        lora_scale=cfg.lora_scale,
        clip_skip=resolved.clip_skip,
        sampler=resolved.sampler,
        scheduler=scheduler_name(resolved.sampler),
        base_model=base_name,
        base_model_sha256=base_hash,
        **{f"this_run_{k}": v for k, v in summary.items()},
    )
    logger.info("%d images (%d new) in %s", len(manifest), made.generated, out)
    return record


def _remove_half_written(out: Path, planes: Sequence[str]) -> None:
    """Delete the temporary files of a killed run's unfinished writes (``.<name>.tmp.png``).

    Only a process alone in the folder, holding its lock, calls this: no one else is writing.
    """
    for plane in planes:
        for path in half_written(out / plane, ".png"):
            logger.info("removing %s, half-written by an interrupted run", path.name)
            path.unlink(missing_ok=True)


def _work(cfg, resolved, batch, only, out):
    """(fixed batches, seed of each image, the images this run makes).

    Batch ``k`` of a plane is always indices ``[k*batch, (k+1)*batch)``, so an image's pixels do
    not depend on which other images a run makes.
    """
    batches = [
        (plane, list(range(k * batch, min(cfg.per_class, (k + 1) * batch))))
        for plane in resolved.planes
        for k in range(math.ceil(cfg.per_class / batch))
    ]
    seeds = {(p, i): image_seed(cfg.seed, p, i) for p, idx in batches for i in idx}
    if not only:
        missing = {k for k in seeds if not image_path(out, k[0], k[1], seeds[k]).is_file()}
        return batches, seeds, missing
    wanted = set(parse_only(only, resolved.planes))
    for plane, index in wanted:
        if index >= cfg.per_class:
            raise ConfigError(f"--only {plane}:{index}: the run has {cfg.per_class} per plane")
    return batches, seeds, wanted


def _load_generator(cfg, resolved, device, dtype):
    """The pipeline (LoRA loaded, sampler set, speed options on) and each plane's embeddings."""
    pipe = load_pipeline(cfg.base, dtype=dtype, config=cfg.base_config)
    pipe.set_progress_bar_config(disable=True)
    if resolved.lora is not None:
        load_lora_into(pipe, resolved.lora, scale=cfg.lora_scale, fuse=cfg.fuse_lora)
    pipe.scheduler = make_scheduler(resolved.sampler, pipe.scheduler.config)
    pipe.to(device)
    apply_speedups(pipe, cfg, device)
    embeddings = {  # once per plane; the negative prompt at the same clip skip
        plane: _plane_embeddings(pipe, plane, cfg, resolved, device)
        for plane in resolved.planes  # each prompt checked before any image is made
    }
    return pipe, embeddings


def _plane_embeddings(pipe, plane: str, cfg, resolved, device):
    """(positive, negative or None) embeddings of a plane's prompt, as A1111 encodes them.

    Each side is its chunks' embeddings, one after the other (1, 77 x chunks, channels).
    """
    prompts = [resolved.prompts[plane]]
    if cfg.guidance > 1.0:
        prompts.append(cfg.negative_prompt)
    chunks = [a1111_chunks(pipe.tokenizer, prompt) for prompt in prompts]
    if any(len(side) > 1 for side in chunks):  # A1111 shows the count as "90/150" tokens
        names = ["prompt", "negative prompt"][: len(chunks)]
        counts = [f"{name} {len(side)}" for name, side in zip(names, chunks, strict=True)]
        logger.info("%s: chunks of 75 tokens, as A1111 encodes them: %s", plane, ", ".join(counts))
    sides = chunked_embeddings(pipe.text_encoder, chunks, resolved.clip_skip, device)
    return sides[0], (sides[1] if len(sides) > 1 else None)


def initial_noise(
    pipe, generators: Sequence[torch.Generator], height: int, width: int
) -> torch.Tensor:
    """Each image's starting latents, drawn in fp32 on the CPU whatever the run's device and dtype.

    The values diffusers draws from the same CPU generators in fp32 (``randn_tensor``), and
    each generator is left where diffusers would leave it, so fp32 images are unchanged, a
    sampler's later noise (Euler a) included. Drawn in the run's dtype instead, a seed's fp16
    image was another image on torch 2.11, whose CPU ``randn`` gives other numbers in half
    precision than in fp32 (2.14.1 gives the same; pytorch/pytorch#179834 changed that kernel).
    AUTOMATIC1111 likewise draws its noise in fp32.

    Args:
        pipe: The pipeline (its UNet's latent channels and its VAE's scale factor).
        generators: One CPU generator per image, seeded with the image's seed.
        height: The images' height in pixels.
        width: The images' width in pixels.

    Returns:
        fp32 CPU latents (len(generators), channels, height / scale, width / scale).
    """
    shape = (1, pipe.unet.config.in_channels)
    shape += (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.cat([torch.randn(shape, generator=generator) for generator in generators])


def _denoise(pipe, embeddings, seeds: list[int], cfg, resolved) -> torch.Tensor:
    """One batch's denoised latents; each image's noise from its own seed."""
    positive, negative = embeddings
    keep = None
    if negative is not None:  # sides of different chunk counts: each attends to its own
        positive, negative, keep = padded_sides(positive, negative)
    n = len(seeds)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    noise = initial_noise(pipe, generators, resolved.height, resolved.width)
    with torch.no_grad(), cross_attention_mask(pipe.unet, _per_image(keep, n)):
        return pipe(
            latents=noise.to(positive.device, positive.dtype),  # as diffusers types them
            prompt_embeds=positive.repeat(n, 1, 1),
            negative_prompt_embeds=negative.repeat(n, 1, 1) if negative is not None else None,
            height=resolved.height,
            width=resolved.width,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            generator=generators,  # where the starting noise left them, for Euler a's noise
            output_type="latent",
        ).images


def _per_image(keep: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Each side's token mask for every image of a batch: n negative rows, then n positive."""
    return None if keep is None else keep.repeat_interleave(n, dim=0)


def to_images(pipe, latents: torch.Tensor, seeds: Sequence[int]) -> np.ndarray:
    """A batch of latents as images (N, H, W, 3) in [0, 1], post-processed as diffusers does."""
    with torch.no_grad():
        pixels = decode_latents(pipe.vae, latents, seeds)
    denormalize = [True] * len(seeds)
    return pipe.image_processor.postprocess(pixels, output_type="np", do_denormalize=denormalize)


def _queue_writes(writer, made, out, plane, indices, seeds, targets, cfg, resolved, images) -> None:
    """Hand one decoded batch's wanted images to the PNG writer."""
    jobs = [
        partial(_save_image, out, plane, index, seed, array, cfg, resolved, made)
        for index, seed, array in zip(indices, seeds, images, strict=True)
        if (plane, index) in targets
    ]
    writer.write(jobs)
    if made.first_batch is None:  # compilation, autotuning and allocation happen here
        made.first_batch = (len(jobs), time.perf_counter())


class _Decoder:
    """Decodes each batch's latents; with ``overlap``, while the next batch denoises.

    The overlapped decode runs on a thread and, on CUDA, a stream of its own: diffusers'
    pipeline waits for the GPU at the start of each call (it copies the timesteps to the device
    and DPM++ reads a step index with ``.item()``), but such waits cover only the work queued on
    the caller's stream, so the decode is not waited for. The first batch is decoded before the
    next one starts (it compiles, autotunes and allocates; the steady rate counts from its end)
    and at most one batch decodes at a time, so memory grows by one batch's latents and one
    decode. A decode's failure raises at the next batch or when the block ends; a batch being
    decoded when the run stops with an error is still written. Without ``overlap`` each batch
    is decoded in the loop, on the caller's thread and stream.
    """

    def __init__(self, pipe, device: torch.device, overlap: bool) -> None:
        self.pipe = pipe
        self.pool = ThreadPoolExecutor(1, "fulora-decode") if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self.pending: tuple[Future, Callable[[np.ndarray], None]] | None = None
        self.first = True

    def decode(self, latents: torch.Tensor, seeds: Sequence[int], then: Callable) -> None:
        """Decode a batch and call ``then(images)`` with its images, on the caller's thread.

        The previous batch's ``then`` runs first (after its decode ends), so batches are
        handed on in order.
        """
        self.finish()
        if self.pool is None:
            then(to_images(self.pipe, latents, seeds))
            return
        ready = None
        if self.stream is not None:  # the decode's stream waits for the latents, not the CPU
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            latents.record_stream(self.stream)  # the allocator must not reuse them meanwhile
        self.pending = (self.pool.submit(self._decode_aside, latents, seeds, ready), then)
        if self.first:
            self.first = False
            self.finish()

    def finish(self) -> None:
        """Wait for the batch being decoded and hand its images on; its failure raises here."""
        if self.pending is None:
            return
        future, then = self.pending
        try:
            images = future.result()
        finally:
            if future.done():  # a wait cut short (Ctrl-C) leaves the batch to __exit__
                self.pending = None
        then(images)

    def _decode_aside(self, latents, seeds, ready) -> np.ndarray:
        if self.stream is None:
            return to_images(self.pipe, latents, seeds)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            return to_images(self.pipe, latents, seeds)  # its copy to the CPU waits for it

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.finish()
            elif self.pending is not None:  # denoised work reaches the disk on an error too
                try:
                    self.finish()
                except Exception:
                    logger.exception("the batch being decoded when the run stopped failed too")
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def decode_latents(vae, latents: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The VAE decode of a batch (in [-1, 1]), as diffusers' pipeline does it, with a NaN guard.

    A half-precision VAE can overflow to NaN on some latents; AUTOMATIC1111 then decodes again
    in fp32 (what its no-half-VAE option does for every image). Here only the images that came
    out NaN are decoded again in fp32, alone, so that every other image keeps its
    half-precision bytes and a resumed run its determinism.

    Raises:
        DataError: An image is NaN even from an fp32 VAE (the latents themselves are broken:
            the UNet overflowed, e.g. with too large a LoRA scale), naming its seeds.
    """
    pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    broken = torch.isnan(pixels).flatten(1).any(dim=1)
    if not bool(broken.any()):
        return pixels
    rows = broken.nonzero().flatten()
    bad_seeds = [seeds[i] for i in rows.tolist()]
    half = vae.dtype
    if half != torch.float32:
        logger.warning("VAE gave NaN in %s for seeds %s: decoding them in fp32", half, bad_seeds)
        vae.to(torch.float32)
        try:
            again = vae.decode(latents[rows].float() / vae.config.scaling_factor)[0]
        finally:
            vae.to(half)
        pixels[rows] = again.to(pixels.dtype)
        still = torch.isnan(again).flatten(1).any(dim=1)
        bad_seeds = [seeds[i] for i in rows[still].tolist()]
    if bad_seeds:
        raise DataError(
            f"the denoised latents of seeds {bad_seeds} decode to NaN even in fp32: the UNet "
            "or the sampler overflowed (try dtype: fp32, a smaller lora_scale, or another sampler)"
        )
    return pixels


@dataclass
class _Made:
    """What a process generated, and when (for images/s)."""

    base_name: str
    base_hash: str
    batch: int
    device: torch.device
    dtype: torch.dtype
    generated: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_batch: tuple[int, float] | None = None  # (images, time) when the first batch was done

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


def _save_image(out, plane, index, seed, array, cfg, resolved, made: _Made) -> None:
    """One PNG, atomically, with its provenance (A1111 ``parameters`` + a ``fulora`` chunk)."""
    row = {
        "path": f"{plane}/{index:05d}-{seed}.png",
        "label": plane,
        "split": "train",
        "source": "synthetic",
        "domain": "synthetic",
        "patient": "",
        "prompt": resolved.prompts[plane],
        "negative_prompt": cfg.negative_prompt,
        "seed": seed,
        "sampler": resolved.sampler,
        "scheduler": scheduler_name(resolved.sampler),
        "clip_skip": resolved.clip_skip,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "width": resolved.width,
        "height": resolved.height,
        "lora": str(resolved.lora.resolve()) if resolved.lora else "",
        "lora_sha256": resolved.lora_sha256,
        "lora_scale": cfg.lora_scale,
        "base_model": made.base_name,
        "created": now_iso(),
        "index": index,
        "run_seed": cfg.seed,
        "batch_size": made.batch,
        "device": made.device.type,
        "dtype": str(made.dtype).removeprefix("torch."),
        "fulora_version": __version__,
    }
    pixels = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if cfg.color == "L":
        img = img.convert("L")
    info = PngInfo()
    info.add_text("parameters", _a1111_parameters(row, cfg, made.base_hash, resolved))
    info.add_text("fulora", json.dumps(row))
    with atomic_path(image_path(out, plane, index, seed)) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


class _ImageWriter:
    """Writes one batch's PNGs on threads while the next batch denoises (0 threads: at once).

    PNG encoding and the fsync of each file are CPU work that would otherwise leave the GPU idle
    between batches. At most one batch waits to be written (memory stays bounded), a failed write
    raises at the next batch, and leaving the block waits for every queued image, so work that
    was denoised is on disk even when the run stops with an error.
    """

    def __init__(self, threads: int, made: _Made, bar) -> None:
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

    def __enter__(self) -> _ImageWriter:
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
