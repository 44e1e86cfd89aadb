"""``fulora lora train``: LoRA fine-tuning of Stable Diffusion on a few captioned images.

diffusers provides the models, peft the LoRA adapters, accelerate the device placement, mixed
precision and multi-GPU/multi-node runs (``accelerate launch fulora lora train ...``: there is
no distributed code path of our own). fulora adds what the paper's kohya-ss workflow did and what
a demanding user expects:

* aspect-ratio buckets, so 1.45:1 ultrasound frames are neither squashed nor cut;
* latent caching (the VAE runs once per image), SDPA attention, gradient checkpointing, fp16/bf16
  mixed precision with fp32 LoRA parameters, noise offset, min-SNR weighting;
* exact resume: every random draw of step ``s`` comes from a generator seeded by (seed, s) and
  the data order of an epoch from (seed, epoch), so a resumed run repeats the uninterrupted one;
* checkpoints (LoRA, optimizer, scheduler, position) written to a temporary folder and renamed,
  so a crash never leaves a half-written LoRA as the latest one;
* a grid of one fixed-seed sample per plane every N steps, the loss curve (CSV and PNG);
* the LoRA saved twice: diffusers/PEFT layout (``pipe.load_lora_weights(RUN_DIR)``) and a
  kohya/AUTOMATIC1111 ``.safetensors`` with the training metadata in its header.

This module holds the entry point and the training loop (its state in ``_LoraRun``); the config
is :mod:`fulora.lora.config`, the data (captions, buckets, dataset, batches, cached latents)
:mod:`fulora.lora.data`, the run's files (checkpoints, loss record, final LoRA)
:mod:`fulora.lora.checkpoints`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fulora.config import check_process_device, require_device
from fulora.data.manifest import Manifest, check_trained_on, with_content_hashes
from fulora.errors import ConfigError, NonFiniteError
from fulora.figures import image_grid
from fulora.io import atomic_open
from fulora.lora.base import base_identity, far_from_native, load_pipeline
from fulora.lora.checkpoints import (
    checkpoint_folders,
    dataset_hash,
    read_loss,
    save_checkpoint,
    save_final,
    write_loss,
)
from fulora.lora.clip_layout import model_path
from fulora.lora.conditioning import encode_prompt, prompt_embeddings
from fulora.lora.config import LoraTrainConfig
from fulora.lora.data import (
    BucketBatchSampler,
    Example,
    ImageCaptions,
    build_examples,
    cache_latents,
    collate,
)
from fulora.lora.formats import DIFFUSERS_WEIGHT_NAME
from fulora.lora.targets import lora_target_modules
from fulora.runs import (
    CONFIG_NAME,
    TRAIN_MANIFEST_NAME,
    RunDir,
    check_finite_weights,
    steady_rate,
)

logger = logging.getLogger("fulora")


WARMUP_STEPS = 2  # steps left out of ``steady_steps_per_s``
#: Steps in a row whose loss is not finite, with finite weights, that stop a run as diverged:
#: one overflow now and then is mixed precision's normal business (the scaler skips it).
MAX_NONFINITE_IN_A_ROW = 10


# --------------------------------------------------------------------------------------------
# Device and optimiser
# --------------------------------------------------------------------------------------------
def _accelerator(cfg: LoraTrainConfig):
    """The ``Accelerator`` of a run: on ``cfg.device``, mixed precision on CUDA only.

    Under ``accelerate launch`` each process takes its own GPU.

    Raises:
        ConfigError: For ``cuda:N`` with several processes.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState

    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    cpu = not cuda and cfg.device != "mps"
    processes = PartialState(cpu=cpu).num_processes
    check_process_device(cfg.device, processes)
    if processes == 1:
        # accelerate keeps one device and precision per process, and refuses another ("restart
        # your runtime"): a run in one process sets its own (an experiment's second variant,
        # a test suite, a notebook). The reset is accelerate's own tests' (AccelerateTestCase).
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()  # it holds the last run's data loaders
    if cfg.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(cfg.device))  # accelerate's "cuda" is the current GPU
    return Accelerator(mixed_precision=cfg.mixed_precision if cuda else "no", cpu=cpu)


def _optimizer(params: list[dict], cfg: LoraTrainConfig, device: torch.device):
    if cfg.optimizer == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, weight_decay=cfg.weight_decay), "AdamW8bit"
            except ImportError:
                logger.warning(
                    "bitsandbytes is not installed: using torch AdamW "
                    "(pip install bitsandbytes for 8-bit AdamW)"
                )
        else:
            logger.info("8-bit AdamW needs CUDA: using torch AdamW on %s", device)
    return torch.optim.AdamW(params, weight_decay=cfg.weight_decay), "AdamW"


def add_lora_adapters(unet, text_encoder, cfg: LoraTrainConfig):
    """Freeze the models and add LoRA adapters; only the adapters are left trainable.

    Returns:
        The peft ``LoraConfig`` of the UNet and of the text encoder (None if not trained).
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)

    def config(targets: list[str]) -> LoraConfig:
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            # peft's True is kohya's init: down kaiming-uniform (a=sqrt 5), up zeros
            init_lora_weights=True if cfg.init == "kohya" else "gaussian",
            target_modules=targets,
        )

    unet_lora = config(lora_target_modules(unet, "unet", cfg.targets))
    unet.add_adapter(unet_lora)
    te_lora = None
    if cfg.train_text_encoder:
        te_lora = config(lora_target_modules(text_encoder, "text_encoder", cfg.targets))
        text_encoder.add_adapter(te_lora)
    return unet_lora, te_lora


def train_lora(
    data: Manifest,
    out: str | Path,
    cfg: LoraTrainConfig,
    *,
    resume: str | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on ``data`` into the run folder ``out``.

    Args:
        data: Training images (with a ``caption`` column for ``caption_source: data``).
        out: Run folder.
        cfg: The configuration.
        resume: ``latest`` or a checkpoint folder to continue from; None starts afresh.
        progress: Show a progress bar.
        on_step: Called with the step number after each optimisation step (and its
            checkpoint); raising from it stops the run as a crash would (tests use it).

    Returns:
        The run's ``done.json`` record.
    """
    require_device(cfg.device)  # before the run folder is made
    out = Path(out)
    existing = RunDir(out)
    finished = _finished_here(existing, cfg, resume)
    check_trained_on(out, data)
    if finished:
        logger.info("%s is already trained with this configuration; nothing to do", out)
        return existing.read_done() or {}
    examples = build_examples(data, cfg)  # data errors before any model loading
    width, height = Counter(e.bucket for e in examples).most_common(1)[0][0]
    if warning := far_from_native(cfg.base, width, height, "the commonest training bucket"):
        logger.warning(warning)
    accelerator = _accelerator(cfg)
    pipe = load_pipeline(cfg.base, config=cfg.base_config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    main = accelerator.is_main_process
    run = RunDir(out, command="fulora lora train")
    if main:
        run.start(cfg)
        training = with_content_hashes(_training_manifest(data, examples))
        training.write(out / TRAIN_MANIFEST_NAME)  # a rerun or resume checks it
    state = _LoraRun(cfg, run, accelerator, weight_dtype, pipe, examples, progress=progress)
    try:
        record = _train(state, data, resume, progress, on_step)
    finally:
        run.close()
    return record


#: What a resumed run may change: where it runs and reads the base's configs, how long it
#: trains, and how often it saves. Anything else would continue another run's adapters.
_RESUMABLE_CHANGES = frozenset(
    {
        "device",
        "base_config",
        "max_steps",
        "epochs",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
    }
)


def _finished_here(existing: RunDir, cfg: LoraTrainConfig, resume: str | None) -> bool:
    """Whether ``existing`` holds this very LoRA, finished; refuse a folder of another run.

    A finished LoRA was once retrained in place, and lost, when a setting changed.

    Raises:
        ConfigError: The folder holds a run with other settings (with ``resume``: other
            settings than :data:`_RESUMABLE_CHANGES`).
    """
    differences = existing.config_differences(cfg)  # read once; empty without a config.yaml
    changed = sorted(differences)
    if resume:
        others = [key for key in changed if key not in _RESUMABLE_CHANGES]
        if others:
            raise ConfigError(
                f"--resume: {existing.path} holds a run with other settings "
                f"({_described(differences, others)}); resume with its own (--config "
                f"{existing.path / CONFIG_NAME}, and those values) or train into a new --out "
                "folder"
            )
        return False
    if changed:
        raise ConfigError(
            f"{existing.path} already holds a LoRA run with other settings "
            f"({_described(differences, changed)}); give its values to use it, or use a "
            "new --out folder"
        )
    return (existing / CONFIG_NAME).is_file() and existing.is_done()


def resize_of_run(folder: str | Path) -> str | None:
    """How a finished LoRA run shrank its images ("area", "box"); None: not a finished run."""
    run = RunDir(folder)
    if not run.is_done() or not (run / CONFIG_NAME).is_file():
        return None
    differences = run.config_differences(LoraTrainConfig())
    return differences["resize"][0] if "resize" in differences else LoraTrainConfig.resize


def _described(differences: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    """``key: 'there' there, 'here' here`` for each of ``keys`` (``RunDir.config_differences``)."""
    return "; ".join(
        f"{key}: {differences[key][0]!r} there, {differences[key][1]!r} here" for key in keys
    )


@dataclass
class _LoraRun:
    """One LoRA fine-tune in progress: its models, data, optimisation and position.

    ``_train`` builds it (models, then data and optimiser, then any checkpoint to resume from)
    and runs the steps; each part reads and updates this object instead of passing ten
    positional arguments around.
    """

    cfg: LoraTrainConfig
    run: RunDir
    accelerator: Any
    weight_dtype: torch.dtype
    pipe: Any
    examples: list[Example]
    progress: bool = True  # progress bars (the main process's only)
    unet: Any = None
    text_encoder: Any = None
    adapters: tuple[Any, Any] = (None, None)  # the peft configs of the UNet and text encoder
    params: list[dict] = field(default_factory=list)
    optimizer: Any = None
    optimizer_name: str = ""
    lr_scheduler: Any = None
    loader: Any = None
    sampler: Any = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    epochs: int = 0
    step: int = 0
    nonfinite_in_a_row: int = 0  # steps whose loss was not finite, up to this one
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """Where the models train (accelerate's ``cuda`` is the current GPU: named here)."""
        device = self.accelerator.device
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def out(self) -> Path:
        """The run folder."""
        return self.run.path


def _train(state: _LoraRun, data: Manifest, resume: str | None, progress: bool, on_step) -> dict:
    """Set up models, data and optimiser, resume if asked, run every step, save the LoRA."""
    _setup_models(state)
    _setup_optimisation(state, progress)
    if resume:
        _resume(state, resume)
    started, first_step = time.perf_counter(), state.step
    steady_from = _run_steps(state, progress, on_step)
    # both rates end here: saving the LoRA and the last sample grid is not training speed
    ended = time.perf_counter()
    seconds, steady = ended - started, steady_rate(steady_from, state.step, ended)
    state.accelerator.wait_for_everyone()
    if not state.accelerator.is_main_process:
        return {}
    return _finish(state, data, seconds, state.step - first_step, steady)


def _setup_models(state: _LoraRun) -> None:
    """Place the models, set the attention, add the LoRA adapters (fp32 weights)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.training_utils import cast_training_params

    cfg, pipe, device, dtype = state.cfg, state.pipe, state.device, state.weight_dtype
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    vae.requires_grad_(False)
    unet.to(device, dtype=dtype)
    vae.to(device, dtype=torch.float32)  # the VAE runs once per image in fp32 (fp16 overflows)
    text_encoder.to(device, dtype=dtype)
    unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
    torch.manual_seed(cfg.seed)  # the adapters' initial weights come from the global RNG
    state.adapters = add_lora_adapters(unet, text_encoder, cfg)
    trained = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    if dtype != torch.float32:
        cast_training_params(trained, dtype=torch.float32)  # LoRA weights stay fp32
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    state.unet, state.text_encoder = unet, text_encoder


def _setup_optimisation(state: _LoraRun, progress: bool) -> None:
    """The dataset (latents cached), bucketed batches, step counts, optimiser and schedule."""
    from diffusers.optimization import get_scheduler

    cfg, vae = state.cfg, state.pipe.vae
    dataset = ImageCaptions(
        state.examples, state.pipe.tokenizer, cfg.center_crop, cfg.resolution, cfg.resize
    )
    if cfg.cache_latents:
        main = state.accelerator.is_main_process
        dataset.latents = cache_latents(vae, dataset, cfg, state.device, progress and main)
        vae.to("cpu")  # not needed again until sampling
    state.sampler = BucketBatchSampler(state.examples, cfg.batch_size, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=state.sampler, collate_fn=collate)
    state.steps_per_epoch = len(state.sampler)
    state.total_steps = cfg.epochs * state.steps_per_epoch
    if cfg.max_steps is not None and cfg.max_steps > 0:
        state.total_steps = cfg.max_steps  # overrides epochs: fewer, or more epochs as needed
    state.epochs = math.ceil(state.total_steps / state.steps_per_epoch)
    state.params = [
        {"params": [p for p in state.unet.parameters() if p.requires_grad], "lr": cfg.unet_lr}
    ]
    if cfg.train_text_encoder:
        te_params = [p for p in state.text_encoder.parameters() if p.requires_grad]
        state.params.append({"params": te_params, "lr": cfg.text_encoder_lr})
    optimizer, state.optimizer_name = _optimizer(state.params, cfg, state.device)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=state.total_steps,
    )
    (
        state.unet,
        state.text_encoder,
        state.optimizer,
        state.loader,
        state.lr_scheduler,
    ) = state.accelerator.prepare(state.unet, state.text_encoder, optimizer, loader, lr_scheduler)


def _resume(state: _LoraRun, resume: str) -> None:
    """Load adapters, optimiser, schedule and position from a checkpoint (or ``latest``)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = checkpoint_folders(state.out)
    if resume == "latest":
        checkpoint = found[-1] if found else None
    else:
        checkpoint = Path(resume)
    if checkpoint is None:
        logger.info("no checkpoint in %s: starting from step 0", state.out)
        return
    if not (checkpoint / "state.json").is_file():
        raise ConfigError(f"{checkpoint} is not a complete fulora LoRA checkpoint")
    unwrap = state.accelerator.unwrap_model
    weights = load_file(str(checkpoint / "lora.safetensors"))
    unet_weights = {k[5:]: v for k, v in weights.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unwrap(state.unet), unet_weights)
    if state.cfg.train_text_encoder:
        te_weights = {k[13:]: v for k, v in weights.items() if k.startswith("text_encoder.")}
        text_encoder = unwrap(state.text_encoder)
        te_weights = {model_path(text_encoder, k): v for k, v in te_weights.items()}
        set_peft_model_state_dict(text_encoder, te_weights)
    state.optimizer.load_state_dict(
        torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    )
    state.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    state.step = json.loads((checkpoint / "state.json").read_text())["step"]
    state.history = [row for row in read_loss(state.out) if row["step"] <= state.step]
    logger.info("resumed from %s at step %d", checkpoint, state.step)


def _run_steps(state: _LoraRun, progress: bool, on_step) -> tuple[int, float] | None:
    """Every remaining step, in the data order of each epoch; (step, time) once warm."""
    from diffusers import DDPMScheduler

    cfg, main = state.cfg, state.accelerator.is_main_process
    noise_scheduler = DDPMScheduler.from_config(state.pipe.scheduler.config)
    state.unet.train()
    if cfg.train_text_encoder:
        state.text_encoder.train()
    bar = tqdm(
        total=state.total_steps,
        initial=state.step,
        desc="lora",
        unit="step",
        disable=not (progress and main),
    )
    first_step, steady_from = state.step, None
    for epoch in range(state.step // state.steps_per_epoch, state.epochs):
        state.sampler.set_epoch(epoch)
        skip = state.step - epoch * state.steps_per_epoch
        for k, batch in enumerate(state.loader):
            if k < skip:
                continue
            if state.step >= state.total_steps:
                break
            value = _optimise(state, _loss(state, noise_scheduler, batch))
            state.nonfinite_in_a_row = 0 if math.isfinite(value) else state.nonfinite_in_a_row + 1
            if state.nonfinite_in_a_row:
                _check_not_diverged(state)
            state.step += 1
            if state.step - first_step == WARMUP_STEPS:
                steady_from = (state.step, time.perf_counter())
            lr = state.lr_scheduler.get_last_lr()[0]
            state.history.append({"step": state.step, "epoch": epoch + 1, "loss": value, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            _checkpoint_and_sample(state)
            if on_step is not None:
                on_step(state.step)
    bar.close()
    return steady_from


def _check_not_diverged(state: _LoraRun) -> None:
    """After a step whose loss is not finite: stop if the LoRA's weights went with it.

    Mixed precision's scaler (fp16) skips a step whose loss overflowed, and the weights stay
    finite; without it (fp32, bf16) that step's NaN gradients reach every LoRA weight. With
    the scaler, weights grown too large for fp16 stay finite but overflow every step: each
    update is skipped and the LoRA learns nothing more, so that many steps in a row stop it too.
    """
    cfg, step = state.cfg, state.step + 1
    models = [state.unet, state.text_encoder] if cfg.train_text_encoder else [state.unet]
    trained = (
        (name, weight)
        for model in models
        for name, weight in state.accelerator.unwrap_model(model).named_parameters()
        if weight.requires_grad
    )
    advice = (
        f"Lower the learning rates (unet_lr {cfg.unet_lr:g}, text_encoder_lr "
        f"{cfg.text_encoder_lr:g}: --unet-lr and --text-encoder-lr with a new --out folder, or "
        "lora.settings in an experiment)."
    )
    check_finite_weights(
        trained, f"the LoRA after step {step}", f"Nothing from that step on was saved. {advice}"
    )
    if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise NonFiniteError(
            f"the loss was not finite at each of the last {state.nonfinite_in_a_row} steps "
            f"(to step {step}): mixed precision skipped every update, so the LoRA stopped "
            f"learning (its weights overflow in {cfg.mixed_precision}); the training diverged. "
            f"No LoRA file was written. {advice}"
        )
    logger.warning("step %d: the loss is not finite; mixed precision skipped that update", step)


def _loss(state: _LoraRun, noise_scheduler, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The denoising loss of one batch; all its randomness comes from (seed, step)."""
    cfg, device, dtype = state.cfg, state.device, state.weight_dtype
    # All randomness of this step comes from (seed, step): resume repeats it exactly.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)
    latents = _latents(state, batch, generator)
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    if cfg.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + cfg.noise_offset * offset.to(device, dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with state.accelerator.autocast():
        hidden = encode_prompt(state.text_encoder, batch["input_ids"].to(device), cfg.clip_skip)
        pred = state.unet(noisy, timesteps, hidden).sample
    prediction = noise_scheduler.config.prediction_type
    if prediction == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if not cfg.snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    weights = min_snr_weights(noise_scheduler, timesteps, cfg.snr_gamma).to(pred.device)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (per_sample.mean(dim=(1, 2, 3)) * weights).mean()


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each sample's loss weight under Min-SNR-gamma (kohya's ``--min_snr_gamma``).

    min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for a v target: the weight of
    the easy, low-noise timesteps falls, so they no longer dominate the loss.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    v_target = noise_scheduler.config.prediction_type == "v_prediction"
    return torch.clamp(snr, max=gamma) / (snr + 1 if v_target else snr)


def _latents(state: _LoraRun, batch: dict[str, torch.Tensor], generator) -> torch.Tensor:
    """The batch's cached latents, or the VAE's sample of them (drawn from ``generator``)."""
    if "latents" in batch:
        return batch["latents"].to(state.device, dtype=state.weight_dtype)
    vae = state.pipe.vae
    with torch.no_grad():
        vae.to(state.device)
        dist = vae.encode(batch["pixels"].to(state.device, torch.float32)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(state.device)
        sample = dist.mean + dist.std * noise
        return (sample * vae.config.scaling_factor).to(state.weight_dtype)


def _optimise(state: _LoraRun, loss: torch.Tensor) -> float:
    """Backward, clip, step; the loss averaged over processes (this syncs the GPU)."""
    accelerator, cfg = state.accelerator, state.cfg
    accelerator.backward(loss)
    if accelerator.sync_gradients and cfg.max_grad_norm:
        accelerator.clip_grad_norm_(
            [p for g in state.params for p in g["params"]], cfg.max_grad_norm
        )
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach().reshape(1)).mean().item()


def _checkpoint_and_sample(state: _LoraRun) -> None:
    """A checkpoint every ``checkpoint_every`` steps, a sample grid every ``sample_every``."""
    cfg, step = state.cfg, state.step
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < state.total_steps:
        save_checkpoint(
            state.out,
            step,
            state.accelerator,
            state.unet,
            state.text_encoder,
            state.optimizer,
            state.lr_scheduler,
            state.history,
            cfg,
        )
    if cfg.sample_every and step % cfg.sample_every == 0 and state.accelerator.is_main_process:
        _sample_grid(state)


def _training_manifest(data: Manifest, examples: list[Example]) -> Manifest:
    """The training images with the caption and bucket each was trained with."""
    return Manifest(
        data.frame.assign(
            caption=[e.caption for e in examples],
            bucket=[e.bucket_name for e in examples],
        ),
        origin=data.origin,
        validate=False,
    )


def _finish(
    state: _LoraRun, data: Manifest, seconds: float, trained_steps: int, steady: float | None
):
    """Save the LoRA (both layouts), the loss, a last sample grid and the training manifest."""
    cfg, out, examples, device = state.cfg, state.out, state.examples, state.device
    unet_m = state.accelerator.unwrap_model(state.unet)
    te_m = state.accelerator.unwrap_model(state.text_encoder) if cfg.train_text_encoder else None
    write_loss(out, state.history)
    identity = base_identity(cfg.base)
    data_hash = dataset_hash(examples)
    unet_lora, te_lora = state.adapters
    save_final(
        out, cfg, unet_m, te_m, unet_lora, te_lora, state.step, identity, data_hash, examples
    )
    _sample_grid(state)
    buckets = [e.bucket_name for e in examples]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return state.run.finish(
        steps=state.step,
        epochs=state.epochs,
        images=len(examples),
        buckets=dict(Counter(buckets)),
        seconds_training=round(seconds, 2),
        steps_per_s=round(trained_steps / seconds, 3) if seconds and trained_steps else None,
        steady_steps_per_s=steady,
        final_loss=state.history[-1]["loss"] if state.history else None,
        optimizer=state.optimizer_name,
        device=str(device),
        mixed_precision=state.accelerator.mixed_precision,
        base_model=identity[0],
        base_model_sha256=identity[1],
        dataset_sha256=data_hash,
        lora_diffusers=str(out / DIFFUSERS_WEIGHT_NAME),
        lora_kohya=str(out / f"{cfg.output_name}.safetensors"),
        peak_gpu_memory_gb=round(peak, 3) if peak is not None else None,
    )


def _sample_grid(state: _LoraRun) -> None:
    """One fixed-seed image per plane with the LoRA as it is now, as samples/step-N.png."""
    out, step, pipe, accelerator = state.out, state.step, state.pipe, state.accelerator
    cfg, examples = state.cfg, state.examples
    unet_m = accelerator.unwrap_model(state.unet)
    te_m = accelerator.unwrap_model(state.text_encoder)
    was_training = unet_m.training
    width, height = Counter(e.bucket for e in examples).most_common(1)[0][0]
    planes: dict[str, str] = {}
    for e in examples:
        planes.setdefault(e.label, e.caption)
    pipe.vae.to(state.device)
    slicing = pipe.vae.use_slicing
    pipe.vae.enable_slicing()  # one image decoded at a time: the batch adds no decode memory
    unet_m.eval()
    te_m.eval()
    try:
        images = _sample_images(state, unet_m, te_m, list(planes.values()), (height, width))
    finally:
        pipe.vae.use_slicing = slicing
        if was_training:
            unet_m.train()
            if cfg.train_text_encoder:
                te_m.train()
        if cfg.cache_latents:
            pipe.vae.to("cpu")
    image_grid(
        out / "samples" / f"step-{step:06d}.png",
        [images],
        col_labels=list(planes),
        title=f"LoRA samples, step {step} (seed {cfg.sample_seed})",
    )
    with atomic_open(out / "samples" / "latest.txt", "w") as handle:
        handle.write(f"step-{step:06d}.png\n")


def _sample_images(
    state: _LoraRun, unet, text_encoder, captions: list[str], size: tuple[int, int]
) -> list[np.ndarray]:
    """An image per caption (uint8), all in one batch.

    Each image gets the noise of the sample seed, as one call per caption drew it (5 planes: one
    UNet call per step instead of five).
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg, pipe = state.cfg, state.pipe
    sampler = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # a sample grid takes a minute or more on a CPU: its steps get a bar once it has taken 2 s
    shown = state.progress and state.accelerator.is_main_process
    desc = f"sample grid, step {state.step}"
    sampler.set_progress_bar_config(disable=not shown, desc=desc, leave=False, delay=2.0)
    guided = cfg.sample_guidance > 1
    with torch.no_grad(), state.accelerator.autocast():
        # Both halves of classifier-free guidance at the training clip skip, as kohya does.
        pairs = [
            prompt_embeddings(
                pipe.tokenizer, text_encoder, c, "" if guided else None, cfg.clip_skip, state.device
            )
            for c in captions
        ]
        result = sampler(
            prompt_embeds=torch.cat([positive for positive, _ in pairs]),
            negative_prompt_embeds=torch.cat([n for _, n in pairs]) if guided else None,
            height=size[0],
            width=size[1],
            num_inference_steps=cfg.sample_steps,
            guidance_scale=cfg.sample_guidance,
            generator=[torch.Generator().manual_seed(cfg.sample_seed) for _ in pairs],
            output_type="np",
        )
    return list((result.images * 255).round().astype(np.uint8))
