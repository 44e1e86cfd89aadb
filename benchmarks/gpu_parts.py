"""The measurements of ``gpu_suite.py``, one part per process: ``python gpu_parts.py PART ...``.

Each part appends rows to its JSON file as it goes (one row per setting), so a part that is
stopped by its time limit or fails half-way still leaves what it measured. Every figure comes
with the obvious alternative measured in the same process:

* ``model``: writes the benchmark model (SD1.5's architecture with random weights, or the tiny
  model with ``--smoke``) once, for the other parts.
* ``lora``: fulora's LoRA trainer (``train_lora``, the paper recipe) at batch 1 and 8, latent
  caching and gradient checkpointing on and off, against a plain loop written the way
  diffusers' ``train_text_to_image_lora.py`` does it (VAE and text encoder every step).
* ``generate``: ``fulora generate`` at several batch sizes and with each speed option, against
  plain ``pipe(prompt)`` one image at a time.
* ``classify``: the paper's five backbones, training and inference steps with AMP and
  channels_last (fulora's defaults on CUDA) against a plain fp32 torchvision loop.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "a photo of fetal brain"
PAPER_ARCHS = ["densenet169", "mobilenet_v2", "efficientnet_b0", "resnet18", "vit_b_16"]
# --smoke: image side of every part (32 px: the same code paths, a quarter of 64 px's pixels,
# so the whole smoke run stays under its 2 minutes on a slow 2-core CPU)
SMOKE_SIDE = 32


class Recorder:
    """Rows of one part, rewritten to its JSON file after each row (atomic replace)."""

    def __init__(self, path: Path, part: str, deadline: float, only: list[str] | None = None):
        self.path, self.part, self.deadline = path, part, deadline
        self.only = list(only or ())  # measure just these settings (a short GPU lease)
        self.data: dict = {"part": part, "rows": [], "errors": [], "skipped": []}
        self.scratch_folders: list[Path] = []
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def row(self, **values) -> None:
        self.data["rows"].append(values)
        self.save()
        print(f"[{self.part}] {values}", flush=True)

    def note(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def scratch(self, prefix: str) -> Path:
        """A new temporary folder for the part's runs, deleted by :meth:`remove_scratch`."""
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.scratch_folders.append(folder)
        return folder

    def remove_scratch(self) -> None:
        """Delete the part's temporary folders (its images, LoRAs and phantom data)."""
        for folder in self.scratch_folders:
            shutil.rmtree(folder, ignore_errors=True)

    def attempt_all(self, rows: list[tuple[str, Callable[[], None], float]]) -> None:
        """``attempt`` each (name, measurement, reserve), in ``only``'s order when it is given.

        The order is the caller's to choose so that a short lease can check whether a row's
        place in the process changes its figure (warm-up, cuDNN's algorithm cache).
        """
        if self.only:
            rows = sorted(rows, key=lambda r: self.only.index(r[0]) if r[0] in self.only else 0)
        for name, fn, reserve in rows:
            self.attempt(name, fn, reserve=reserve)

    def attempt(self, name: str, fn: Callable[[], None], *, reserve: float = 0.0) -> None:
        """Run one measurement unless the part's time is up; record a failure and go on."""
        if self.only and name not in self.only:
            return
        if time.time() + reserve > self.deadline:
            self.data["skipped"].append(name)
            self.save()
            print(f"[{self.part}] skipped {name}: out of time", flush=True)
            return
        # kept in the file while it runs: if the part is killed at its limit, the report can
        # say which row was cut short and after how long (e.g. a compile that never finished)
        self.note("running", {"name": name, "started": time.time()})
        try:
            fn()
        except Exception as err:  # one setting's failure must not lose the others
            self.data["errors"].append({"name": name, "error": f"{type(err).__name__}: {err}"})
            self.save()
            traceback.print_exc()
        finally:
            self.data.pop("running", None)
            self.save()
            _free()


class _RowLister(Recorder):
    """Collects the names of the rows a part would measure; measures and writes nothing."""

    def __init__(self) -> None:  # no file, no deadline
        self.names: list[str] = []

    def note(self, key: str, value) -> None:
        pass

    def scratch(self, prefix: str) -> Path:
        return Path(tempfile.gettempdir()) / f"{prefix}not-created"

    def attempt_all(self, rows: list[tuple[str, Callable[[], None], float]]) -> None:
        self.names += [name for name, _, _ in rows]


def row_names(part: str, smoke: bool) -> list[str]:
    """The names of the rows ``part`` measures, in order (what ``--only`` takes); runs none.

    The model part has none: it builds the benchmark model, whatever ``--only`` says.
    """
    if part == "model":
        return []
    lister = _RowLister()
    PARTS[part](argparse.Namespace(smoke=smoke, model=None), lister)
    return lister.names


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _cudnn_autotuning(on: bool):
    """``torch.backends.cudnn.benchmark`` set to ``on`` for one measurement, then restored.

    (Not ``torch.backends.cudnn.flags``: it also sets every other cuDNN flag to its defaults.)
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


# --------------------------------------------------------------------------------------- model


def part_model(args, rec: Recorder) -> None:
    from fulora.lora.tiny import save_sd15_random, save_tiny_model

    start = time.perf_counter()
    if args.smoke:
        save_tiny_model(args.model)
    else:
        save_sd15_random(args.model)
    rec.row(model=str(args.model), seconds=round(time.perf_counter() - start, 1))


# ---------------------------------------------------------------------------------------- LoRA


def _lora_settings(smoke: bool) -> list[tuple[int, bool, bool, bool]]:
    """(batch, cache latents, gradient checkpointing, cuDNN autotuning), most informative first."""
    if smoke:
        return [(1, True, False, False), (2, False, True, False)]
    return [
        (1, True, False, False),  # the paper recipe as fulora runs it
        (1, True, False, True),  # the same with torch.backends.cudnn.benchmark on
        (1, False, False, False),
        (1, True, True, False),
        (8, True, False, False),
        (8, True, True, False),
        (8, False, False, False),
        (1, False, True, False),
        (8, False, True, False),
    ]


def part_lora(args, rec: Recorder) -> None:
    from fulora.data.phantom import PhantomConfig, generate_phantom
    from fulora.data.readers import read_any

    size = SMOKE_SIDE if args.smoke else 512
    rank = 4 if args.smoke else 128
    steps = 4 if args.smoke else 14
    tmp = rec.scratch("fulora-bench-lora-")

    @functools.cache  # made by the first row that runs (none when only listing the rows)
    def data():
        per_class = 2 if args.smoke else 20
        generate_phantom(tmp / "data", PhantomConfig(per_class=per_class, grid=False))
        return read_any(tmp / "data")

    rec.note("setting", f"{size} px, rank {rank}, kohya targets + text encoder, {steps} steps")
    reserve = 0 if args.smoke else 20
    rows = [
        (
            f"fulora batch {b} cache {c} ckpt {k}" + (" cudnn_benchmark" * t),
            lambda b=b, c=c, k=k, t=t: _fulora_lora(
                rec, args.model, data(), tmp, size, rank, steps, b, c, k, t
            ),
            reserve,
        )
        for b, c, k, t in _lora_settings(args.smoke)
    ]
    rows += [
        (
            f"plain batch {b}",
            lambda b=b: _plain_lora(rec, args.model, data(), size, rank, steps, b),
            reserve,
        )
        for b in ((1, 2) if args.smoke else (1, 8))
    ]
    rec.attempt_all(rows)


def _fulora_lora(rec, model, data, tmp, size, rank, steps, batch, cache, ckpt, tuned) -> None:
    from fulora.lora.train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(
        base=str(model),
        rank=rank,
        alpha=rank,
        targets="kohya",
        resolution=size,
        center_crop=True,  # every image size x size: the figure is for 512 px
        bucket_step=min(64, size),  # a smoke run's images are smaller than kohya's step
        batch_size=batch,
        repeats=1000,
        max_steps=steps,
        cache_latents=cache,
        gradient_checkpointing=ckpt,
        optimizer="adamw8bit",
        mixed_precision="fp16",
        clip_skip=2,
        sample_every=0,
        sample_steps=1,
        seed=0,
    )
    _free()
    with _cudnn_autotuning(tuned):
        record = train_lora(data, tmp / f"run-{batch}-{cache}-{ckpt}-{tuned}", cfg, progress=False)
    rate = record["steady_steps_per_s"] or record["steps_per_s"]
    rec.row(
        loop="fulora",
        batch=batch,
        cache_latents=cache,
        checkpointing=ckpt,
        cudnn_benchmark=tuned,
        steps_per_s=rate,
        images_per_s=round(rate * batch, 3),
        peak_gib=record["peak_gpu_memory_gb"],
        optimizer=record["optimizer"],
        paper_1000_steps_min=round(1000 / rate / 60, 2) if batch == 1 else None,
    )


def _plain_lora(rec, model, data, size, rank, steps, batch) -> None:
    """The loop of diffusers' train_text_to_image_lora.py, with the paper's LoRA set and rank.

    fp16 frozen weights and fp32 LoRA weights, VAE encode and text encoder every step, 8-bit
    AdamW when bitsandbytes is there; no latent cache, no clip skip bookkeeping, no checkpoints.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe, params = _plain_lora_pipeline(model, rank, device, dtype)
    optimizer = _plain_optimizer(params, device)
    step = _plain_lora_step(pipe, params, optimizer, list(data.paths), size, batch, dtype)
    pipe.unet.train()
    pipe.text_encoder.train()
    _free()
    for k in range(2):  # warm-up, as fulora's steady rate leaves out its first two steps
        step(k)
    start = time.perf_counter()
    for k in range(2, steps):
        step(k)
    _sync()
    rate = (steps - 2) / (time.perf_counter() - start)
    rec.row(
        loop="plain (diffusers example)",
        batch=batch,
        cache_latents=False,
        checkpointing=False,
        steps_per_s=round(rate, 3),
        images_per_s=round(rate * batch, 3),
        peak_gib=_peak_gib(),
        optimizer=type(optimizer).__name__,
        paper_1000_steps_min=round(1000 / rate / 60, 2) if batch == 1 else None,
    )


def _plain_lora_pipeline(model, rank, device, dtype):
    """The frozen pipeline on ``device`` with fp32 LoRA adapters on kohya's layers; their params."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from fulora.lora.targets import lora_target_modules

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    unet, te = pipe.unet, pipe.text_encoder
    for module in (unet, pipe.vae, te):
        module.requires_grad_(False)
        module.to(device, dtype=dtype)
    for module, part in ((unet, "unet"), (te, "text_encoder")):
        targets = lora_target_modules(module, part, "kohya")
        module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    cast_training_params([unet, te], dtype=torch.float32)
    return pipe, [p for m in (unet, te) for p in m.parameters() if p.requires_grad]


def _plain_optimizer(params, device) -> torch.optim.Optimizer:
    """8-bit AdamW on CUDA when bitsandbytes is installed (the paper recipe's), else AdamW."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=1e-4)


def _plain_lora_step(pipe, params, optimizer, paths, size, batch, dtype) -> Callable[[int], float]:
    """Step ``k`` of the plain loop: load and encode the images, predict the noise, update."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    device = unet.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer([PROMPT] * batch, padding="max_length", max_length=77, return_tensors="pt")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def load(i: int) -> torch.Tensor:
        img = Image.open(paths[i % len(paths)]).convert("RGB").resize((size, size))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1

    def step(k: int) -> float:
        pixels = torch.stack([load(k * batch + j) for j in range(batch)]).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            hidden = te(ids.input_ids.to(device))[0]
            pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---------------------------------------------------------------------------------- generation


def _gen_sizes(smoke: bool) -> tuple[int, int, list[int]]:
    """(side, steps, batch sizes)."""
    return (SMOKE_SIDE, 4, [1, 4]) if smoke else (512, 30, [1, 8, 16, 32])


def part_generate(args, rec: Recorder) -> None:
    side, steps, batches = _gen_sizes(args.smoke)
    rec.note("setting", f"{side}x{side}, {steps} steps, DPM++ 2M Karras, CFG 7")
    tmp = rec.scratch("fulora-bench-gen-")
    default = dict(channels_last=False, fuse_qkv=False, compile=False, write_threads=2)
    rows = [("plain pipe(prompt) batch 1", lambda: _plain_generate(rec, args, side, steps), 0)]
    rows += [
        (
            f"fulora batch {b}",
            lambda b=b: _fulora_generate(rec, args, tmp, side, steps, b, default),
            0 if args.smoke else 15,
        )
        for b in batches
    ]
    top = batches[-1]
    compiled = dict(default, compile=True)
    fastest = dict(compiled, fuse_qkv=True)
    options = [
        ("write_threads 0", dict(default, write_threads=0)),  # PNGs written in the loop
        ("channels_last on", dict(default, channels_last=True)),
        ("fuse_qkv", dict(default, fuse_qkv=True)),
        ("compile", compiled),
        ("compile + fuse_qkv", fastest),
        ("compile + channels_last", dict(compiled, channels_last=True)),
        # cuDNN autotuning (torch.backends.cudnn.benchmark) for the compiled convolutions
        ("compile + cudnn_benchmark", dict(compiled, cudnn_benchmark=True)),
        # CUDA graphs, then PyTorch's diffusion-fast inductor settings and kernel search: those
        # two compile for minutes (inductor_tuning: over 6 on an H200), so they come last
        (
            "compile reduce-overhead + fuse_qkv",
            dict(compiled, fuse_qkv=True, compile_mode="reduce-overhead"),
        ),
        (
            "compile + fuse_qkv + inductor_tuning",
            dict(compiled, fuse_qkv=True, inductor_tuning=True),
        ),
        (
            "compile max-autotune + fuse_qkv + inductor_tuning",
            dict(compiled, fuse_qkv=True, inductor_tuning=True, compile_mode="max-autotune"),
        ),
    ]
    # the best option at the smaller batches too (a 12 GB card runs batch 8), before the rows
    # that compile for minutes
    settings = [(top, name, opts) for name, opts in options]
    at = [name for name, _ in options].index("compile + fuse_qkv")
    settings[at + 1 : at + 1] = [(b, *options[at]) for b in batches[1:-1]]
    if args.smoke:  # inductor's CPU compile of the UNet alone outlasts the smoke budget
        rec.note("not_in_smoke", "compile options (GPU run only)")
        settings = [s for s in settings if not s[2]["compile"]]
    option_rows = [
        (
            f"fulora batch {b} {name}",
            lambda b=b, o=opts, n=name: _fulora_generate(rec, args, tmp, side, steps, b, o, n),
            0 if args.smoke else (150 if opts["compile"] else 15),
        )
        for b, name, opts in settings
    ]
    # the decode overlap's rows before those that compile for minutes (none in a smoke run)
    names = [name for name, _, _ in option_rows]
    slow = next((i for i, n in enumerate(names) if "reduce-overhead" in n), len(names))
    overlap_rows = _overlap_rows(rec, args, tmp, side, steps, batches, default, fastest)
    rec.attempt_all(rows + option_rows[:slow] + overlap_rows + option_rows[slow:])


def _overlap_rows(rec, args, tmp, side, steps, batches, default: dict, fastest: dict) -> list:
    """Rows of each setting with and without ``decode_overlap``, at 6 batches instead of 3.

    The overlap hides one decode per batch after the first (which decodes alone), hence the
    longer runs. At batch 8 and the top batch with the defaults, and at the top batch with the
    fastest setting so far (compiled: not in a smoke run, which makes 2 batches: enough to run
    the overlapped path).
    """
    top, count = batches[-1], 2 if args.smoke else 6
    settings = [(b, "", default) for b in dict.fromkeys(batches[1:] if args.smoke else (8, top))]
    if not args.smoke:
        settings.append((top, " compile + fuse_qkv", fastest))
    rows = []
    for b, name, opts in settings:
        for overlap in ("", " + decode_overlap"):
            label = f"{count} batches{name}{overlap}"
            setting = dict(opts, decode_overlap=bool(overlap))
            run = functools.partial(
                _fulora_generate, rec, args, tmp, side, steps, b, setting, label, batches=count
            )
            reserve = 0 if args.smoke else (150 if opts["compile"] else 30)
            rows.append((f"fulora batch {b} {label}", run, reserve))
    return rows


def _plain_generate(rec, args, side, steps) -> None:
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.base import load_pipeline

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    pipe = load_pipeline(str(args.model), dtype=torch.float16 if cuda else torch.float32)
    pipe = pipe.to(device)
    pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=side, width=side, num_inference_steps=steps, guidance_scale=7.0)
    pipe(PROMPT, **kwargs)  # warm-up
    images = 2 if args.smoke else 6
    _free()
    _sync()
    start = time.perf_counter()
    for i in range(images):
        pipe(PROMPT, generator=torch.Generator().manual_seed(i), **kwargs)
    _sync()
    rate = images / (time.perf_counter() - start)
    rec.row(
        way="plain pipe(prompt)",
        batch=1,
        options="",
        images_per_s=round(rate, 3),
        peak_gib=_peak_gib(),
    )


def _fulora_generate(rec, args, tmp, side, steps, batch, options, name="default", batches=3):
    """One run of ``batches`` batches (5 at batch 1): the first warms up (and compiles), the
    rest count."""
    from fulora.generate.run import GenerateConfig, generate

    options = dict(options)
    tuned = options.pop("cudnn_benchmark", False)

    cfg = GenerateConfig(
        base=str(args.model),
        planes=["brain"],
        per_class=batch * batches if batch > 1 else 5,
        steps=steps,
        width=side,
        height=side,
        batch_size=batch,
        guidance=7.0,
        contact_sheet=0,
        vae_slicing=False,  # the figure is for speed; slicing saves memory at big batches
        **options,
    )
    out = tmp / f"run-{batch}-{name.replace(' ', '_')}"
    with _cudnn_autotuning(tuned):
        result = generate(out, cfg, progress=False)
    rec.row(
        way="fulora generate",
        batch=batch,
        options=name,
        images_per_s=result["this_run_steady_images_per_s"],
        first_batch_s=result["this_run_first_batch_s"],
        peak_gib=_peak_gib(),
        **_difference(out, tmp / f"run-{batch}-default"),
    )


def _difference(run: Path, default: Path) -> dict:
    """Grey-level difference of a run's images from the default options' (same seeds)."""
    import numpy as np
    from PIL import Image

    if run == default or not default.is_dir():
        return {}
    diffs = []
    for path in sorted(run.glob("brain/*.png")):
        other = default / path.relative_to(run)
        if other.is_file():
            a = np.asarray(Image.open(path), dtype=np.int16)
            diffs.append(np.abs(a - np.asarray(Image.open(other), dtype=np.int16)))
    if not diffs:
        return {}
    stacked = np.stack(diffs)
    return {"mean_grey_diff": round(float(stacked.mean()), 3), "max_grey_diff": int(stacked.max())}


# --------------------------------------------------------------------------------- classifiers


# how each classifier row trains: None is the plain torchvision loop written here (the obvious
# alternative); the others are fulora's own loop (start_fit + train_epoch) with these
# ClassifyConfig settings, whose CUDA defaults are fp16 autocast + channels-last
_CLASSIFY_WAYS: dict[str, dict | None] = {
    "plain fp32": None,
    "fulora (AMP + channels_last)": {},  # the defaults
    # options. The fused SGD takes the loss scaler's overflow flag on the device: no per-step
    # read of the GPU (session 10 found the defaults slower than fp32 for the CNNs at batch 24)
    "fulora (AMP + channels_last + fused SGD)": {"fused_optimizer": True},
    # each half of the defaults alone: which one slows the convolutional networks
    "fulora (AMP)": {"channels_last": False},
    "fulora (fp32 + channels_last)": {"amp": False},
    # bf16 needs no loss scaling (no per-step GPU read); CUDA graphs for launch-bound small
    # networks at batch 24
    "fulora (bf16 + channels_last)": {"amp_dtype": "bf16"},
    "fulora (AMP + channels_last + compile reduce-overhead)": {
        "compile": True,
        "compile_mode": "reduce-overhead",
    },
}


def part_classify(args, rec: Recorder) -> None:
    size = SMOKE_SIDE if args.smoke else 224
    steps = 2 if args.smoke else 12
    archs = ["resnet18", "mobilenet_v2"] if args.smoke else PAPER_ARCHS
    rec.note(
        "setting",
        f"{size} px, train batch 24 (SGD m0.9), inference batch 64; the fulora rows time "
        "fulora's training loop itself (start_fit + train_epoch)",
    )
    ways = list(_CLASSIFY_WAYS)
    if args.smoke:  # inductor's CPU compile outlasts the smoke budget; no bf16 autocast on CPU
        rec.note("not_in_smoke", "the half-default, bf16 and compile ways (GPU run only)")
        ways = ways[:3]
    # the paper's two ways for every backbone first, then the options (after them, so that a
    # full run's budget goes to the figures the projection needs)
    order = [(a, w) for w in ways[:2] for a in archs] + [(a, w) for w in ways[2:] for a in archs]
    rec.attempt_all(
        [
            (
                f"{arch} {way}",
                lambda a=arch, w=way: _classify_speed(rec, a, w, size, steps),
                0 if args.smoke else (60 if (_CLASSIFY_WAYS[way] or {}).get("compile") else 10),
            )
            for arch, way in order
        ]
    )


def classify_way_config(way: str):
    """The ClassifyConfig a classifier row trains with; the plain loop's: fp32, NCHW."""
    from fulora.classify.train import ClassifyConfig

    settings = _CLASSIFY_WAYS[way]
    return ClassifyConfig(
        **({"amp": False, "channels_last": False} if settings is None else settings)
    )


def _classify_speed(rec, arch, way, size, steps) -> None:
    from fulora.classify.registry import create_model
    from fulora.classify.train import speed_settings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = classify_way_config(way)
    amp, last = speed_settings(cfg, device)
    layout = torch.channels_last if last else torch.contiguous_format
    model, _ = create_model(arch, 5, pretrained=False, log=False)
    model = model.to(device, memory_format=layout)  # as fulora's _prepare places it
    x = torch.randn(24, 3, size, size, device=device)
    y = torch.randint(0, 5, (24,), device=device)
    if _CLASSIFY_WAYS[way] is None:
        train_rate = 24 / _time_per_call(_plain_train_step(model, x, y), steps)
    else:
        train_rate = _fulora_train_rate(model, cfg, (amp, last), x, y, steps)
    train_peak = _peak_gib()
    x_inf = torch.randn(64, 3, size, size, device=device).contiguous(memory_format=layout)

    def infer_step() -> None:  # as fulora's _evaluate: no_grad, the training autocast
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x_inf)

    model.eval()
    infer_rate = 64 / _time_per_call(infer_step, steps)
    rec.row(
        arch=arch,
        way=way,
        train_images_per_s=round(train_rate, 1),
        infer_images_per_s=round(infer_rate, 1),
        epoch_6148_s=round(6148 / train_rate, 1),
        train_peak_gib=train_peak,
    )


def _plain_train_step(model, x, y) -> Callable[[], None]:
    """A torchvision-tutorial step: fp32, SGD, the loss not read."""
    from torch import nn

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _fulora_train_rate(model, cfg, speed, x, y, steps: int) -> float:
    """Images/s of fulora's training loop (``start_fit`` + ``train_epoch``, which reads the
    loss once per epoch) over ``steps`` batches of ``x``, after 3 warm-up batches; ``speed``:
    (autocast type, channels-last) as ``speed_settings`` gave them."""
    from torch import nn

    from fulora.classify.train import start_fit, train_epoch

    (amp, last), device = speed, x.device
    fit = start_fit(model, cfg, amp)
    criterion = nn.CrossEntropyLoss()
    train_epoch(fit, [(x, y)] * 3, criterion, device, amp, last)  # compile, cuDNN, allocator
    _sync()
    start = time.perf_counter()
    train_epoch(fit, [(x, y)] * steps, criterion, device, amp, last)
    _sync()
    return 24 * steps / (time.perf_counter() - start)


def _time_per_call(fn: Callable[[], None], calls: int) -> float:
    for _ in range(3):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - start) / calls


PARTS = {
    "model": part_model,
    "lora": part_lora,
    "generate": part_generate,
    "classify": part_classify,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--model", type=Path, required=True, help="benchmark model folder")
    parser.add_argument("--json", type=Path, required=True, help="where this part's rows go")
    parser.add_argument("--deadline", type=float, required=True, help="unix time to stop by")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU sizes")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="just these settings")
    args = parser.parse_args()
    logging.getLogger("fulora").setLevel(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one line per measured row is the progress
    rec = Recorder(args.json, args.part, args.deadline, args.only)
    try:
        PARTS[args.part](args, rec)
    finally:
        rec.remove_scratch()


if __name__ == "__main__":
    main()
