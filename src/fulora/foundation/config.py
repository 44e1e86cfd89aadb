"""The recipe of the foundation model ``fulora:phantom-sd`` (``configs/foundation.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from fulora.config import AT_LEAST_0, AT_LEAST_1, FRACTION_BELOW_1, POSITIVE, SEED, Checked, Range
from fulora.errors import ConfigError


@dataclass
class FoundationConfig(Checked):
    """The recipe of the foundation model (``configs/foundation.yaml``)."""

    RANGES = {
        "seed": SEED,
        "corpus_size": AT_LEAST_1,
        "height": Range(16),
        "width": Range(16),
        "vae_steps": AT_LEAST_1,
        "vae_batch_size": AT_LEAST_1,
        "vae_lr": POSITIVE,
        "vae_kl_weight": AT_LEAST_0,
        "unet_steps": AT_LEAST_1,
        "unet_batch_size": AT_LEAST_1,
        "unet_lr": POSITIVE,
        "text_encoder_lr": AT_LEAST_0,
        "warmup_steps": AT_LEAST_0,
        "caption_dropout": FRACTION_BELOW_1,
        "ema_decay": FRACTION_BELOW_1,
        "checkpoint_every": AT_LEAST_1,
    }

    seed: int = 0
    corpus_size: int = 20000
    height: int = 48
    width: int = 64
    vae_steps: int = 1200
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 8000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    text_encoder_lr: float = 2e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    keep_work: bool = False  # keep work/ (corpus cache, checkpoints) after saving the model

    def check(self) -> None:
        """The VAE halves the sides twice and the UNet twice more: multiples of 16."""
        if self.height % 16 or self.width % 16:
            raise ConfigError(
                f"'height' and 'width' must be multiples of 16, got {self.height}x{self.width}"
            )
