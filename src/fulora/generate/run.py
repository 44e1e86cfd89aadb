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
sampler, steps, guidance, size, LoRA file and hash, LoRA scale, base model, time). Those files
are :mod:`fulora.generate.output`'s; the decode is :mod:`fulora.generate.decode`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fulora.config import check_process_device, require_device, resolve_device
from fulora.data.manifest import MANIFEST_NAME
from fulora.errors import ConfigError, DataError
from fulora.generate.config import GenerateConfig, check_rng_device
from fulora.generate.decode import Decoder
from fulora.generate.encode import empty_prompt, encode_prompts, unet_rows
from fulora.generate.guidance import Conditioning, UncondSkip, guided, padded_sides
from fulora.generate.hires import upscale_decoded, upscale_latents
from fulora.generate.hires_size import HiresTarget, hires_target
from fulora.generate.inversions import (
    check_embedding_hashes,
    embedding_files,
    load_textual_inversions,
)
from fulora.generate.noise import ImageNoise, latent_shape
from fulora.generate.output import (
    ImageWriter,
    Made,
    build_manifest,
    contact_sheet,
    image_path,
    queue_writes,
    read_png_provenance,
)
from fulora.generate.prompts import check_prompt_syntax
from fulora.generate.samplers import (
    IMAGE_UPSCALERS,
    Img2ImgSteps,
    display_name,
    make_scheduler,
    resolve_sampler,
    scheduler_name,
)
from fulora.generate.schedules import schedule_steps
from fulora.generate.sigmas import DiscreteSigmas
from fulora.io import file_hash, half_written
from fulora.lora.base import (
    base_identity,
    check_base,
    check_model_hash,
    far_from_native,
    load_pipeline,
    native_size,
)
from fulora.lora.formats import load_lora_into, read_lora, set_lora_scales, webui_lora_hash
from fulora.planes import PAPER_CAPTIONS, check_planes
from fulora.runs import CONFIG_NAME, DONE_NAME, RunDir, check_finite_weights

logger = logging.getLogger("fulora")


# settings that change how fast images are written, never their bytes: a run may resume with
# another value (and an older run folder's config.yaml may not have the key at all)
# settings that change no pixel: speed, and the checks of the files an image names
_SPEED_ONLY = {"write_threads", "decode_overlap", "lora_hash", "model_hash"}


def image_seed(run_seed: int, plane: str, index: int, scheme: str = "hashed") -> int:
    """The seed of image ``index`` of ``plane`` in a run seeded ``run_seed``.

    ``hashed`` (fulora's): 32 bits of a hash of all three, so planes and runs differ.
    ``consecutive``: ``run_seed + index``, as AUTOMATIC1111 numbers a batch's images (the same
    seeds in every plane, as one A1111 run per plane with that seed would give).
    """
    if scheme == "consecutive":
        return run_seed + index
    digest = hashlib.sha256(f"fulora:{run_seed}:{plane}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


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
    # plane -> the LoRA's (text encoder, UNet) multipliers: its prompt's <lora:...>, else
    # lora_scale for both
    lora_weights: dict[str, tuple[float, float]] = field(default_factory=dict)
    # each textual-inversion embedding file's name -> its SHA-256 (the files a rerun must keep)
    embeddings_sha256: dict[str, str] = field(default_factory=dict)
    negative_prompt: str = ""  # as A1111 reads it (without comments, if they are on)


def plan(cfg: GenerateConfig) -> _Plan:
    """Resolve prompts, size, LoRA and batch size from the config and the LoRA's metadata."""
    planes = check_planes(cfg.planes)
    lora = _resolve_lora(cfg.lora)
    metadata: dict[str, str] = {}
    webui_hash, names = "", None
    if lora is not None:
        found = read_lora(lora)
        webui_hash = webui_lora_hash(found.path, found.metadata)
        names = _a1111_names(found.path, found.metadata)
        check_finite_weights(
            found.tensors.items(),
            f"the LoRA {found.path}",
            "Every image made with it would be NaN, decoded as black: use another LoRA, or "
            "retrain it with lower learning rates (--unet-lr, --text-encoder-lr).",
        )
        metadata = found.metadata
    _check_lora_hash(cfg.lora_hash, lora, webui_hash)
    # each there, of a kind A1111 reads, before any model loads
    embeddings = {file.stem: file_hash(file) for file in embedding_files(cfg.embeddings)}
    captions = json.loads(metadata.get("fulora_captions", "{}") or "{}")
    given = dict(zip(check_planes(cfg.prompts), cfg.prompts.values(), strict=True))
    prompts = {
        plane: cfg.as_read(given.get(plane) or captions.get(plane) or PAPER_CAPTIONS[plane])
        for plane in planes
    }
    steps = schedule_steps(resolve_sampler(cfg.sampler), cfg.steps)
    for plane in sorted(set(captions) & set(planes) - set(given)):  # given: checked in the config
        what = f"the LoRA's caption for {plane} (give prompts.{plane})"
        guided = cfg.guidance > 1
        reading = cfg.prompt_reading | {"hires_steps": cfg.hires_prompt_steps}
        check_prompt_syntax(prompts[plane], what, steps, guided=guided, **reading)
    lora_weights = cfg.lora_weights(prompts, names)  # without a LoRA: a tag is refused
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
    if warning := far_from_native(cfg.base, width, height, "the images' size"):
        logger.warning(warning)
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
        lora_weights=lora_weights if lora is not None else {},
        embeddings_sha256=embeddings,
        negative_prompt=cfg.as_read(cfg.negative_prompt),
    )


def _check_lora_hash(wanted: str | None, lora: Path | None, webui_hash: str) -> None:
    """The LoRA must be the file an A1111 image names (its "Lora hashes"), when one is given."""
    if wanted is None:
        return
    if lora is None:
        raise ConfigError(
            f"lora_hash {wanted} names the LoRA an image was made with, and the run has none: "
            "give its file in lora (--lora)"
        )
    if not webui_hash.lower().startswith(wanted.lower()):
        raise ConfigError(
            f"the LoRA {lora} has the A1111 hash {webui_hash[:12]}, and lora_hash asks for "
            f"{wanted} (the image's 'Lora hashes'): give the LoRA the image was made with "
            "(--lora), or leave lora_hash out"
        )


def _a1111_names(path: Path, metadata: dict[str, str]) -> tuple[str, ...]:
    """The names A1111 finds a LoRA file by in ``<lora:name>``: its stem and its alias."""
    alias = metadata.get("ss_output_name") or path.stem
    return (path.stem,) if alias == path.stem else (path.stem, alias)


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
    if lora is not None and "ss_clip_skip" not in metadata:
        logger.info("LoRA %s records no clip skip: clip skip 1 (--clip-skip to change)", lora)
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


def _hires_target(cfg: GenerateConfig, resolved: _Plan) -> HiresTarget | None:
    """Where the hires pass upscales the plan's first pass to; None: no hires fix."""
    if not cfg.hires_fix:
        return None
    return hires_target(resolved.width, resolved.height, cfg.hires_scale, cfg.hires_resize)


def _image_size(cfg: GenerateConfig, resolved: _Plan) -> tuple[int, int]:
    """The (width, height) of the images written: the hires pass's, else the plan's."""
    target = _hires_target(cfg, resolved)
    return target.size if target is not None else (resolved.width, resolved.height)


def _auto_batch(device: torch.device, width: int, height: int, rows: int = 2) -> int:
    """Images per batch that fit the GPU's free memory; ``rows``: UNet rows per image."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    # ~0.6 GB per 512x512 image in fp16 with SDPA (UNet activations under CFG: 2 rows), 4 GB
    # headroom; an AND prompt runs a row per part besides the negative's
    per_image = 0.6 * (width * height) / (512 * 512) * rows / 2
    return int(max(1, min(32, (free / 2**30 - 4.0) / per_image)))


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
    if cfg.model_hash is not None:  # hashed once: base_identity takes it from the cache
        check_model_hash(cfg.base, cfg.model_hash)
    check_rng_device(cfg.rng, str(resolve_device(cfg.device)))
    folder = RunDir(out)
    # the rounding is checked on the images made (_check_same_making): none made, none mixed
    checked_on_images = _SPEED_ONLY | {"pixel_rounding"}
    changed = [k for k in folder.changed_config_keys(cfg) or () if k not in checked_on_images]
    made_with = _images_made_with(folder, resolved.planes)
    if made_with and _sampler_that_made(made_with) == resolved.sampler and "sampler" in changed:
        changed.remove("sampler")  # another name of the same sampler ("DDIM (diffusers)")
    if changed and not only:
        raise ConfigError(
            f"{out} already holds images made with another configuration "
            f"({', '.join(changed)} differ); use another --out folder"
        )
    _check_same_making(out, resolved, made_with, cfg.pixel_rounding)
    require_device(cfg.device)
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    check_process_device(cfg.device, state.num_processes)
    # one process: the setting (accelerate's state may hold an earlier run's device); several
    # (accelerate launch): each process's own GPU
    device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.dtype, torch.float16 if device.type == "cuda" else torch.float32
    )
    steps = schedule_steps(resolved.sampler, cfg.steps)
    prompts = [resolved.prompts[plane] for plane in resolved.planes]
    rows = unet_rows(prompts, steps, guided=cfg.guidance > 1)
    batch = resolved.batch_size or _auto_batch(device, *_image_size(cfg, resolved), rows)
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


def _check_same_making(
    out: Path, resolved: _Plan, made_with: dict[str, Any] | None, pixel_rounding: str
) -> None:
    """Images already in ``out`` were made as this run makes them, so that none are mixed.

    The same LoRA file, embedding files, sampler and rounding of the pixels (``pixel_rounding``;
    diffusers' until session 34).

    The LoRA's path may hold another file now (a LoRA trained again into the same folder): a
    rerun mixed the two sets, or, finished, recorded the new file for the old images; so may
    the textual-inversion embeddings' (a file added to the folder may take a prompt's words
    that the earlier images read as text). A sampler
    name may have changed meaning (``DDIM`` and ``DPM++ 2M Karras`` were diffusers' until
    session 24).

    Raises:
        ConfigError: Naming both files' hashes, or both samplers or roundings and how to finish
            the run.
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
    embeddings = made_with.get("embeddings_sha256", {})
    if embeddings != resolved.embeddings_sha256:
        named = ", ".join(sorted(embeddings)) or "none"
        raise ConfigError(
            f"{out} holds images made with other textual-inversion embeddings (files {named}, "
            "or other files of those names) than this run's: give the same --embeddings, or "
            "use another --out folder"
        )
    sampler = _sampler_that_made(made_with)
    if sampler not in (None, resolved.sampler):
        raise ConfigError(
            f"{out} holds images made with the sampler {display_name(sampler)!r}, and this run's "
            f"is {display_name(resolved.sampler)!r}: finish them with --sampler {sampler} "
            f"(in an experiment, generate.settings.sampler: {sampler}), or use another --out "
            "folder"
        )
    rounding = _rounding_that_made(made_with)
    if rounding not in (None, pixel_rounding):
        raise ConfigError(
            f"{out} holds images whose pixels were rounded to 8 bits by {rounding!r}, and this "
            f"run's pixel_rounding is {pixel_rounding!r}: finish them with "
            f"--pixel-rounding {rounding}, or use another --out folder (in an experiment, "
            f"--from generate makes every generation's images again, as {pixel_rounding!r} "
            "rounds)"
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
    if named == "unipc" and record["scheduler"] == "UniPCMultistepScheduler":
        return "unipc_diffusers"  # diffusers' own UniPC made it, fulora's until session 32
    return named


def rounding_of_run(out: str | Path) -> str | None:
    """How a finished run's images were rounded to 8 bits (``pixel_rounding``); None: unfinished."""
    done = RunDir(out).read_done()
    return _rounding_that_made(done) if done is not None else None


def _rounding_that_made(record: dict[str, Any]) -> str | None:
    """The ``pixel_rounding`` of a PNG's or ``done.json``'s record (None: not a generation's)."""
    if "sampler" not in record:  # a folder another command finished
        return None
    return record.get("pixel_rounding", "round")  # diffusers' rounding until session 34


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
    mine, seeds, targets = _my_batches(cfg, resolved, batch, only, out, part)
    base_name, base_hash = base_identity(cfg.base)
    made = Made(base_name=base_name, base_hash=base_hash, batch=batch, device=device, dtype=dtype)
    if mine:
        pipe, embeddings, lora, inversions = _load_generator(cfg, resolved, device, dtype)
        made.padded = {plane: conditioning.padded for plane, conditioning in embeddings.items()}
        made.inversions = {
            plane: {name: inversions.by_name[name].sha256 for name in conditioning.inversions_used}
            for plane, conditioning in embeddings.items()
        }
        made.started = time.perf_counter()  # images/s measures generation, not model loading
        bar = tqdm(
            total=sum(sum((p, i) in targets for i in idx) for p, idx in mine),
            desc=f"generating ({part.index + 1}/{part.count})",
            unit="img",
            disable=not progress,
        )
        with (
            ImageWriter(cfg.write_threads, made, bar) as writer,
            Decoder(pipe, device, cfg.decode_overlap) as decoder,
        ):
            for plane, indices in mine:
                plane_seeds = [seeds[(plane, i)] for i in indices]
                # a batch takes minutes on a CPU: its steps get a bar once it has taken 2 s
                pipe.set_progress_bar_config(
                    desc=f"denoising {plane}", disable=not progress, leave=False, delay=2.0
                )
                lora.use(plane)
                passes = embeddings[plane]
                latents = _denoise(
                    pipe, passes.first_pass, plane_seeds, cfg, resolved, indices, passes.hires_pass
                )
                write = (writer, made, out, plane, indices, plane_seeds, targets, cfg, resolved)
                decoder.decode(latents, plane_seeds, then=partial(queue_writes, *write))
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
        size="x".join(map(str, _image_size(cfg, resolved))),
        lora=str(resolved.lora or ""),
        lora_sha256=resolved.lora_sha256,
        embeddings_sha256=resolved.embeddings_sha256,
        lora_scale=cfg.lora_scale,
        lora_weights=resolved.lora_weights,
        clip_skip=resolved.clip_skip,
        sampler=resolved.sampler,
        scheduler=scheduler_name(resolved.sampler),
        pixel_rounding=cfg.pixel_rounding,
        base_model=base_name,
        base_model_sha256=base_hash,
        **{f"this_run_{k}": v for k, v in summary.items()},
    )
    logger.info("%d images (%d new) in %s", len(manifest), made.generated, out)
    return record


def _my_batches(cfg, resolved, batch: int, only, out: Path, part: _Share):
    """The batches of this process's share with an image to make; every image's seed; those images.

    The share is cut from the full list of batches, not from what is left, so that processes
    that start at different times (Ray shards, a resumed run) never skip or repeat a batch.
    """
    batches, seeds, targets = _work(cfg, resolved, batch, only, out)
    mine = [
        (plane, indices)
        for plane, indices in batches[part.index :: part.count]
        if any((plane, i) in targets for i in indices)
    ]
    return mine, seeds, targets


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
    # with a variation A1111 gives each image of a batch the same seed (and its own variation seed)
    fixed = cfg.variation_strength > 0
    seeds = {
        (p, i): image_seed(cfg.seed, p, 0 if fixed else i, cfg.seed_scheme)
        for p, idx in batches
        for i in idx
    }
    if not only:
        missing = {k for k in seeds if not image_path(out, k[0], k[1], seeds[k]).is_file()}
        return batches, seeds, missing
    wanted = set(parse_only(only, resolved.planes))
    for plane, index in wanted:
        if index >= cfg.per_class:
            raise ConfigError(f"--only {plane}:{index}: the run has {cfg.per_class} per plane")
    return batches, seeds, wanted


def _load_generator(cfg, resolved, device, dtype):
    """The pipeline (LoRA loaded, sampler set, speed options on) and what it conditions on.

    Returns:
        The pipeline, each plane's prompt embeddings, the LoRA's weights per plane, and the
        textual-inversion embeddings (None: none).
    """
    pipe = load_pipeline(cfg.base, dtype=dtype, config=cfg.base_config)
    pipe.set_progress_bar_config(disable=True)
    inversions = None
    if cfg.embeddings:
        width = pipe.text_encoder.config.hidden_size
        hashes = resolved.embeddings_sha256  # the plan's, not hashed again
        inversions = load_textual_inversions(cfg.embeddings, pipe.tokenizer, width, hashes)
    check_embedding_hashes(cfg.embedding_hashes, inversions)
    # A1111 encodes the empty prompt that pads a side as it loads the model, without the LoRA
    empty = empty_prompt(pipe, resolved.clip_skip, "cpu") if cfg.pad_conds == "on" else None
    lora = _PlaneLora(pipe, cfg, resolved)
    schedule, churn, unipc = cfg.sigma_schedule(), cfg.churn(), cfg.unipc_options()
    config = pipe.scheduler.config
    hires = cfg.hires_fix
    pipe.scheduler = make_scheduler(resolved.sampler, config, schedule, churn, unipc, hires)
    pipe.to(device)
    apply_speedups(pipe, cfg, device)
    embeddings = {}
    for plane in resolved.planes:  # once per plane; the negative prompt at the same clip skip
        lora.use(plane)  # the text encoder's multiplier too
        encode = partial(_plane_embeddings, pipe, plane, cfg, resolved, device, empty, inversions)
        embeddings[plane] = _PlaneConditioning(encode(), encode(hires=True) if hires else None)
    return pipe, embeddings, lora, inversions


@dataclass(frozen=True)
class _PlaneConditioning:
    """A plane's conditioning in each pass: the first, and the hires pass's (None: none)."""

    first_pass: Conditioning
    hires_pass: Conditioning | None = None

    @property
    def padded(self) -> bool:
        """Whether a pass padded the sides (A1111 writes "Pad conds" for either)."""
        hires = self.hires_pass
        return self.first_pass.padded or (hires is not None and hires.padded)

    @property
    def inversions_used(self) -> tuple[str, ...]:
        """The embeddings either pass used (A1111 lists all its texts used), the first's first."""
        hires = self.hires_pass.inversions_used if self.hires_pass is not None else ()
        return tuple(dict.fromkeys(self.first_pass.inversions_used + hires))


class _PlaneLora:
    """The run's LoRA at each plane's weights (A1111 applies a prompt's ``<lora:...>``).

    Fused into the weights when every plane has the same weights; else left on its adapter
    layers and set before each plane.
    """

    def __init__(self, pipe, cfg, resolved) -> None:
        self.pipe, self.weights = pipe, resolved.lora_weights
        self.now: tuple[float, float] | None = None  # None: fused, or no LoRA
        if resolved.lora is None:
            return
        distinct = set(self.weights.values())
        text_encoder, unet = self.weights[resolved.planes[0]]
        fuse = cfg.fuse_lora and len(distinct) == 1
        if cfg.fuse_lora and not fuse:
            logger.info("LoRA left unfused: the prompts' <lora:...> give planes other weights")
        load_lora_into(pipe, resolved.lora, scale=unet, text_encoder_scale=text_encoder, fuse=fuse)
        self.now = None if fuse else (text_encoder, unet)

    def use(self, plane: str) -> None:
        """Set the adapter layers to ``plane``'s weights (nothing to do when fused)."""
        wanted = self.weights[plane] if self.now is not None else None
        if wanted is not None and wanted != self.now:
            set_lora_scales(self.pipe, wanted[1], text_encoder_scale=wanted[0])
            self.now = wanted


def _plane_embeddings(
    pipe, plane: str, cfg, resolved, device, empty=None, inversions=None, hires: bool = False
) -> Conditioning:
    """A plane's prompt and negative prompt (under guidance), as A1111 conditions on them.

    ``hires``: as A1111 schedules them over the hires pass (its own encoding of them).
    """
    negative = resolved.negative_prompt if cfg.guidance > 1 else None
    steps = schedule_steps(resolved.sampler, cfg.steps)
    prompt, clip_skip = resolved.prompts[plane], resolved.clip_skip
    return encode_prompts(
        pipe,
        prompt,
        negative,
        steps,
        clip_skip,
        device,
        f"{plane} (hires pass)" if hires else plane,
        pad=cfg.pad_conds,
        empty=empty,
        inversions=inversions,
        hires_steps=cfg.hires_prompt_steps if hires else None,
        **cfg.prompt_reading,
    )


def _denoise(
    pipe,
    conditioning: Conditioning,
    seeds: list[int],
    cfg,
    resolved,
    indices=None,
    hires: Conditioning | None = None,
) -> torch.Tensor:
    """One batch's denoised latents; each image's noise from its own seed.

    With a variation, image ``index`` of ``indices`` also takes the variation seed
    ``variation_seed + index``, as A1111 numbers a batch's. With the hires fix (``hires``,
    the hires pass's conditioning), the first pass's latents upscaled and denoised again at
    the larger size (:func:`_hires_pass`).
    """
    noise = _image_noise(pipe, cfg, seeds, indices, resolved.width, resolved.height)
    latents = noise.first()  # as A1111's RNG settings draw it
    size = (resolved.width, resolved.height)
    latents = _sample(pipe, conditioning, noise, latents, cfg.steps, size, cfg, resolved)
    if hires is None:
        return latents
    return _hires_pass(pipe, hires, latents, seeds, cfg, resolved, indices)


def _image_noise(pipe, cfg, seeds, indices, width: int, height: int) -> ImageNoise:
    """The batch's noise at a size, drawn as A1111's ``ImageRNG`` draws it (on the CPU)."""
    varied = [cfg.variation_seed_of(i) for i in indices] if cfg.variation_strength else None
    resize_from = None
    if cfg.seed_resize_from_width is not None:  # A1111's latent size: pixels // 8
        scale = pipe.vae_scale_factor
        resize_from = (cfg.seed_resize_from_height // scale, cfg.seed_resize_from_width // scale)
    return ImageNoise(
        cfg.rng,
        seeds,
        latent_shape(pipe, height, width),
        pipe.unet.device,
        cfg.eta_noise_seed_delta,
        variation_seeds=varied,
        variation_strength=cfg.variation_strength,
        resize_from=resize_from,
    )


def _sample(pipe, conditioning, noise, latents, steps: int, size, cfg, resolved) -> torch.Tensor:
    """One pass of the sampler from ``latents`` (times its start's scale), as latents."""
    positive, negative = conditioning.first()
    if negative is not None:  # one shape for diffusers' batch; ``guided`` masks the padding
        positive, negative, _ = padded_sides(positive, negative)
    n = len(latents)
    with (
        torch.no_grad(),
        guided(pipe.unet, conditioning, n, _uncond_skip(pipe, cfg, resolved, steps)),
        _step_noise(pipe, noise, cfg),
    ):
        return pipe(
            latents=latents.to(positive.device, positive.dtype),  # as diffusers types them
            prompt_embeds=positive.repeat(n, 1, 1),
            negative_prompt_embeds=negative.repeat(n, 1, 1) if negative is not None else None,
            height=size[1],
            width=size[0],
            num_inference_steps=steps,
            guidance_scale=cfg.guidance,
            generator=noise.generators,  # Euler a's step noise (cpu, gpu)
            output_type="latent",
        ).images


def _hires_pass(pipe, conditioning, latents, seeds, cfg, resolved, indices) -> torch.Tensor:
    """A1111's hires pass (``fulora.generate.hires``) of a batch's first-pass latents.

    They are upscaled, noised anew from each image's seed at the larger size, and sampled
    over the end of a longer schedule (the scheduler's ``img2img``: the tail of its sigmas, or
    the lower points of its grid).
    """
    target = _hires_target(cfg, resolved)
    upscaled = _upscaled(pipe, latents, target, seeds, cfg, resolved)
    width, height = target.size
    noise = _image_noise(pipe, cfg, seeds, indices, width, height)
    steps = cfg.hires_steps or cfg.steps
    scheduler = pipe.scheduler
    scheduler.img2img = Img2ImgSteps(steps, cfg.denoising_strength)
    try:
        scheduler.set_timesteps(steps, device=upscaled.device)  # its first sigma, for the start
        start = scheduler.img2img_start(upscaled, noise.first())
        return _sample(pipe, conditioning, noise, start, steps, (width, height), cfg, resolved)
    finally:
        scheduler.img2img = None


def _upscaled(pipe, latents, target: HiresTarget, seeds, cfg, resolved) -> torch.Tensor:
    """The first pass's latents upscaled to the hires pass's target by ``hires_upscaler``."""
    scale = pipe.vae_scale_factor
    if cfg.hires_upscaler not in IMAGE_UPSCALERS:
        return upscale_latents(latents, target, cfg.hires_upscaler, scale)
    # A1111's CPU source drew the first pass's "Seed resize from" noise, where its size is not
    # the first pass's, from the global generator that the VAE's sample then draws from
    skipped: tuple[int, ...] = ()
    if cfg.rng == "cpu" and cfg.seed_resize_from_width is not None:
        size = (cfg.seed_resize_from_height // scale, cfg.seed_resize_from_width // scale)
        if size != (resolved.height // scale, resolved.width // scale):
            skipped = (pipe.unet.config.in_channels, *size)
    return upscale_decoded(pipe, latents, target, cfg.hires_upscaler, seeds, skipped)


def _uncond_skip(pipe, cfg, resolved, steps: int) -> UncondSkip | None:
    """The calls that run without the negative prompt (A1111's Skip Early CFG and NGMS).

    ``steps``: the pass's (A1111 counts a hires pass's calls over its own steps).
    """
    if not (cfg.skip_early_cfg or cfg.ngms):
        return None
    table = getattr(pipe.scheduler, "sigma_table", None)  # A1111's alpha_bar options, if any
    sigmas = table() if table else DiscreteSigmas(pipe.scheduler.alphas_cumprod)

    def sigma_of(timestep) -> float:  # the sampler's sigma, as k-diffusion hands A1111's model
        return sigmas.t_to_sigma(torch.as_tensor(timestep).flatten()[0].cpu()).item()

    total = schedule_steps(resolved.sampler, steps)
    return UncondSkip(
        cfg.guidance, total, cfg.skip_early_cfg, cfg.ngms, cfg.ngms_all_steps, sigma_of
    )


@contextmanager
def _step_noise(pipe, noise: ImageNoise, cfg):
    """The step noise of the ancestral and SDE samplers and DDIM, at the run's eta.

    fulora's Euler a (``a1111_schedulers.A1111EulerAncestralScheduler``) takes it from its
    ``step_noise`` for ``rng: nv``, which is no torch generator, and for an eta other than 1,
    which diffusers' step does not take; fulora's DDIM at an eta above 0; DPM2 a, DPM++ 2S a,
    DPM fast and Restart always, and Euler, Heun and DPM2 with A1111's churn
    (``needs_step_noise``); the SDE samplers from Brownian trees seeded with each
    image's seed (``brownian``, ``noise_seeds``). The scheduler names its eta setting
    (``eta_setting``); the other samplers draw no step noise.
    """
    scheduler = pipe.scheduler
    key = getattr(scheduler, "eta_setting", None)
    brownian, needed = (getattr(scheduler, a, False) for a in ("brownian", "needs_step_noise"))
    default = getattr(type(scheduler), "eta", None)
    eta = getattr(cfg, key) if key else default
    own_draw = noise.generators is not None and not (needed or brownian) and eta == default
    if (key is None and not needed) or own_draw:
        yield  # none, or diffusers' own draw from the generators (Euler a at eta 1)
        return
    scheduler.step_noise, scheduler.eta = noise.step_noise, eta
    if brownian:
        scheduler.noise_seeds = list(noise.seeds)
    try:
        yield
    finally:
        scheduler.step_noise, scheduler.eta = None, default
        if brownian:
            scheduler.noise_seeds = None
