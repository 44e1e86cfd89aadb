"""``fulora foundation build``: pretrain the tiny foundation model from nothing, on a CPU or GPU.

The recipe, as Stable Diffusion was made, scaled down:

1. **Corpus**: ``corpus_size`` unlabelled phantom scans from as many simulated machines, with
   captions about the machine only (``fulora.foundation.corpus``).
2. **VAE**: an ``AutoencoderKL`` trained to reconstruct them (L1 + MSE, a small KL term); its
   latent scaling factor is set so latents have unit variance, as SD's 0.18215 does.
3. **UNet and text encoder**: trained together on the VAE's latents with the epsilon
   objective on SD1.5's noise schedule, captions dropped 10% of the time so classifier-free
   guidance works, an EMA of the weights kept for the saved model.
4. **Saved** as a diffusers folder in fp16 with ``MODEL_CARD.md`` (recipe, corpus, steps, time,
   loss curves, sample grid, the sha256 of every file), ``config.yaml`` and ``loss.csv``.

Every random draw of step ``s`` comes from a generator seeded by (seed, stage, s), so the build
is reproducible and resumes exactly from its checkpoints (``work/``, removed once the model is
saved). Rebuilding with the same config gives the same loss curve, within floating-point noise
across machines.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fulora.errors import ConfigError
from fulora.foundation.card import sample_grid, save_model
from fulora.foundation.config import FoundationConfig
from fulora.foundation.corpus import corpus_image
from fulora.foundation.model import foundation_components
from fulora.io import atomic_path, write_text
from fulora.lora.conditioning import token_ids
from fulora.runs import RunDir, check_finite_weights

logger = logging.getLogger("fulora")

SAMPLE_EVERY = 2000  # UNet steps between progress sample grids in work/ (not in the recipe)


class Corpus:
    """The corpus: pixels (N, H, W) uint8 and one caption per image, rendered on first use."""

    def __init__(self, cfg: FoundationConfig):
        self.cfg = cfg
        self.pixels = np.zeros((cfg.corpus_size, cfg.height, cfg.width), np.uint8)
        self.captions = [""] * cfg.corpus_size
        self.rendered = np.zeros(cfg.corpus_size, bool)

    def __len__(self) -> int:
        return self.cfg.corpus_size

    def images(self, indices: np.ndarray) -> np.ndarray:
        """Pixels of ``indices``, rendering any not rendered yet."""
        for i in indices[~self.rendered[indices]]:
            image = corpus_image(self.cfg.seed, int(i), (self.cfg.height, self.cfg.width))
            self.pixels[i], self.captions[i], self.rendered[i] = image.pixels, image.caption, True
        return self.pixels[indices]


def _generator(cfg: FoundationConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 100_000_007 + step)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def render_corpus(work: Path, cfg: FoundationConfig, progress: bool) -> Corpus:
    """Render (or read back) the whole corpus; cached in ``work/corpus.npz``."""
    corpus = Corpus(cfg)
    cache = work / "corpus.npz"
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        if data["pixels"].shape == corpus.pixels.shape:
            corpus.pixels, corpus.captions = data["pixels"], [str(c) for c in data["captions"]]
            corpus.rendered[:] = True
            return corpus
    for i in tqdm(range(len(corpus)), desc="corpus", unit="img", disable=not progress):
        corpus.images(np.array([i]))
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, pixels=corpus.pixels, captions=np.array(corpus.captions))
    return corpus


def _to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) grayscale -> (B, 3, H, W) in [-1, 1], as SD's VAE takes RGB."""
    x = torch.from_numpy(pixels).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


class _Trainer:
    """One training stage (VAE, or UNet + text encoder): step loop, checkpoints, loss log."""

    def __init__(self, name: str, work: Path, modules: dict[str, torch.nn.Module], optimizer):
        self.name = name
        self.path = work / f"{name}.pt"
        self.modules = modules
        self.optimizer = optimizer
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0

    def resume(self) -> None:
        """Continue from this stage's checkpoint, if there is one."""
        if not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        logger.info("%s: resumed at step %d", self.name, self.step)

    def save(self) -> None:
        """Write the checkpoint atomically (a kill mid-write keeps the previous one)."""
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "seconds": self.seconds,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def check_finite(self) -> None:
        """After a loss that is not finite: stop before NaN weights reach the checkpoint."""
        flags = "--vae-lr" if self.name == "vae" else "--unet-lr and --text-encoder-lr"
        check_finite_weights(
            ((f"{k}.{n}", p) for k, m in self.modules.items() for n, p in m.named_parameters()),
            f"the foundation build's {self.name} stage after step {self.step + 1}",
            f"Its checkpoint ({self.path}) keeps the weights before that step. Lower the "
            f"stage's learning rate ({flags}, or the recipe's) and build into a new --out folder.",
        )

    def run(
        self,
        total: int,
        step_fn,
        cfg: FoundationConfig,
        lrs: list[float],
        progress: bool,
        on_checkpoint=None,
    ):
        """Call ``step_fn(step) -> loss`` until ``total`` steps, with schedule and checkpoints.

        ``on_checkpoint(step)`` runs after each checkpoint (the UNet stage saves samples).
        """
        bar = tqdm(
            total=total, initial=self.step, desc=self.name, unit="step", disable=not progress
        )
        while self.step < total:
            started = time.perf_counter()
            factor = _lr_factor(self.step, total, cfg.warmup_steps)
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr * factor
            loss = step_fn(self.step)
            if not math.isfinite(loss):
                self.check_finite()
            self.step += 1
            self.seconds += time.perf_counter() - started
            self.history.append({"stage": self.name, "step": self.step, "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.save()
                if on_checkpoint is not None:
                    on_checkpoint(self.step)
        bar.close()


def train_vae(vae, corpus: Corpus, work: Path, cfg: FoundationConfig, progress: bool) -> _Trainer:
    """Train the autoencoder to reconstruct corpus images (L1 + MSE + a small KL term)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    trainer = _Trainer("vae", work, {"vae": vae}, optimizer)
    trainer.resume()
    vae.train()

    def step(s: int) -> float:
        generator = _generator(cfg, 1, s)
        index = torch.randint(0, len(corpus), (cfg.vae_batch_size,), generator=generator)
        x = _to_input(corpus.images(index.numpy()))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = loss + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    trainer.run(cfg.vae_steps, step, cfg, [cfg.vae_lr], progress)
    vae.eval().requires_grad_(False)
    return trainer


@torch.no_grad()
def encode_corpus(vae, corpus: Corpus, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of every corpus image: (mean, std), each (N, 4, H/4, W/4)."""
    means, stds = [], []
    for start in range(0, len(corpus), batch):
        indices = np.arange(start, min(len(corpus), start + batch))
        dist = vae.encode(_to_input(corpus.images(indices))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    parts: dict,
    posterior: tuple[torch.Tensor, torch.Tensor],
    corpus: Corpus,
    work: Path,
    cfg: FoundationConfig,
    progress: bool,
) -> tuple[_Trainer, dict[str, torch.nn.Module]]:
    """Train UNet and text encoder together on the latents; returns the trainer and EMA copies."""
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    scaling = parts["vae"].config.scaling_factor
    ids = token_ids(parts["tokenizer"], corpus.captions)
    empty = token_ids(parts["tokenizer"], [""])[0]
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False)}
    ema["text_encoder"] = copy.deepcopy(text_encoder).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr},
        ],
        weight_decay=1e-2,
    )
    modules = {"unet": unet, "text_encoder": text_encoder}
    trainer = _Trainer("unet", work, modules | {f"ema_{k}": v for k, v in ema.items()}, optimizer)
    trainer.resume()
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    means, stds = posterior

    def step(s: int) -> float:
        generator = _generator(cfg, 2, s)
        n = cfg.unet_batch_size
        index = torch.randint(0, len(means), (n,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = latents * scaling
        drop = torch.rand(n, generator=generator) < cfg.caption_dropout
        batch_ids = torch.where(drop[:, None], empty[None], ids[index])
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(batch_ids)[0]
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + s) / (10 + s))
        with torch.no_grad():
            for key, module in modules.items():
                for e, p in zip(ema[key].parameters(), module.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        return float(loss.detach())

    def samples(s: int) -> None:
        from diffusers import StableDiffusionPipeline

        if s % SAMPLE_EVERY:
            return

        pipe = StableDiffusionPipeline(**(parts | ema))
        sample_grid(work / f"samples-{s:06d}.png", pipe, seed=cfg.seed, per_caption=4, steps=20)

    trainer.run(cfg.unet_steps, step, cfg, [cfg.unet_lr, cfg.text_encoder_lr], progress, samples)
    return trainer, ema


def build_foundation(out: str | Path, cfg: FoundationConfig, *, progress: bool = True) -> dict:
    """Pretrain the foundation model into ``out`` (a diffusers folder with a model card).

    Args:
        out: Output folder; ``work/`` inside it holds the corpus cache and checkpoints until
            the model is saved, so an interrupted build resumes where it stopped.
        cfg: The recipe.
        progress: Show progress bars.

    Returns:
        The ``done.json`` record.

    Raises:
        ConfigError: For out-of-range settings, or ``out`` holding another recipe's build.
    """
    out = Path(out)
    existing = RunDir(out)
    changed = existing.changed_config_keys(cfg)
    if changed:
        raise ConfigError(
            f"{out} holds a build with another recipe ({', '.join(changed)} differ); "
            "use another --out folder"
        )
    if existing.is_done():
        logger.info("%s is already built with this recipe; nothing to do", out)
        return existing.read_done() or {}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    run = RunDir(out, command="fulora foundation build").start(cfg)
    try:
        return _build(out, work, run, cfg, progress)
    finally:
        run.close()


def _build(out: Path, work: Path, run: RunDir, cfg: FoundationConfig, progress: bool) -> dict:

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    corpus = render_corpus(work, cfg, progress)
    parts = foundation_components(cfg.seed, work / "tokenizer")
    vae_trainer = train_vae(parts["vae"], corpus, work, cfg, progress)
    means, stds = encode_corpus(parts["vae"], corpus)
    # SD's scaling factor idea: latents of unit variance for the diffusion model
    scaling = float(1.0 / means.std())
    parts["vae"].register_to_config(scaling_factor=scaling)
    unet_trainer, ema = train_denoiser(parts, (means, stds), corpus, work, cfg, progress)
    parts.update(ema)
    history = vae_trainer.history + unet_trainer.history
    _write_loss(out, history)
    record = save_model(
        out,
        parts,
        cfg,
        corpus,
        history=history,
        build_seconds={
            "vae": round(vae_trainer.seconds, 1),
            "unet": round(unet_trainer.seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    )
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return run.finish(**record)


def vae_loss_start(cfg: FoundationConfig, steps: int, work: Path) -> list[float]:
    """The first ``steps`` VAE losses of a build of ``cfg``, recomputed from nothing.

    Within the warm-up the learning rate does not depend on the total step count, so these
    equal the first losses of the full build: a cheap check that a rebuild reproduces it.
    """
    if steps > cfg.warmup_steps:
        raise ConfigError(f"steps must be at most warmup_steps ({cfg.warmup_steps}), got {steps}")
    short = replace(cfg, vae_steps=steps, checkpoint_every=steps)
    torch.manual_seed(cfg.seed)
    parts = foundation_components(cfg.seed, work / "tokenizer")
    trainer = train_vae(parts["vae"], Corpus(short), work, short, progress=False)
    return [row["loss"] for row in trainer.history]


def _write_loss(out: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["stage", "step", "loss"])
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "loss.csv", buffer.getvalue())


def read_loss(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a build's ``loss.csv``."""
    with open(path, encoding="utf-8") as handle:
        return [
            {"stage": r["stage"], "step": int(r["step"]), "loss": float(r["loss"])}
            for r in csv.DictReader(handle)
        ]
