"""The configuration of ``fulora lora train`` (and the default base model).

Kept apart from the training code, which imports torch, diffusers and peft, so that the CLI and
``fulora experiment run --dry-run`` check a configuration in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fulora.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, Checked, Range
from fulora.errors import ConfigError

#: Stable Diffusion 1.5 on the Hugging Face hub: the paper's base model.
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: kohya: kohya-ss's standard LoRA layers (the paper's); attention: attention projections only.
TargetPreset = Literal["kohya", "attention"]


@dataclass
class LoraTrainConfig(Checked):
    """Configuration of ``fulora lora train``; defaults follow the paper's kohya-ss recipe."""

    RANGES = {
        "rank": AT_LEAST_1,
        "alpha": POSITIVE,
        "unet_lr": POSITIVE,
        "text_encoder_lr": AT_LEAST_0,  # 0: the text encoder's LoRA stays at its init
        "lr_warmup_steps": AT_LEAST_0,
        "weight_decay": AT_LEAST_0,
        "max_grad_norm": AT_LEAST_0,  # 0: no clipping
        "batch_size": AT_LEAST_1,
        "repeats": AT_LEAST_1,
        "epochs": AT_LEAST_1,
        "max_steps": AT_LEAST_1,
        "resolution": Range(8),
        "bucket_step": Range(8),
        "clip_skip": Range(1, 12),  # SD1.5's CLIP has 12 layers
        "seed": SEED,
        "noise_offset": Range(0, 1),
        "snr_gamma": POSITIVE,
        "checkpoint_every": AT_LEAST_0,
        "keep_checkpoints": AT_LEAST_1,
        "sample_every": AT_LEAST_0,
        "sample_steps": AT_LEAST_1,
        "sample_guidance": AT_LEAST_0,
        "sample_seed": SEED,
    }

    # A run folder's config.yaml without this key was written before it existed: it means this.
    ABSENT_MEANS = {"resize": "box"}

    def check(self) -> None:
        """Caption keys are planes; bucket steps divide the resolution (kohya: multiples of 8)."""
        self.check_planes_of("captions")
        if self.bucket_step % 8 or self.resolution % 8:
            raise ConfigError(
                f"'resolution' ({self.resolution}) and 'bucket_step' ({self.bucket_step}) must "
                "be multiples of 8"
            )
        if self.buckets and self.bucket_step > self.resolution:
            raise ConfigError(
                f"'bucket_step' ({self.bucket_step}) must be at most 'resolution' "
                f"({self.resolution}); set bucket_step to {min(64, self.resolution)}"
            )

    base: str = DEFAULT_BASE  # hub id, diffusers folder or .safetensors/.ckpt file
    base_config: str | None = None  # configs for a single-file base offline
    rank: int = 128
    alpha: float = 128.0
    train_text_encoder: bool = True
    # kohya: kohya-ss's standard LoRA (every Linear/1x1 conv of the UNet's transformer blocks
    # and of CLIP's attention and MLP); attention: the attention projections only.
    targets: TargetPreset = "kohya"
    # kohya: down kaiming-uniform (a=sqrt 5), up zeros (kohya, peft's default); gaussian:
    # down N(0, 1/rank), which is 2-4x smaller at rank 128 and 4-8x larger at rank 8.
    init: Literal["kohya", "gaussian"] = "kohya"
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # 8-bit needs CUDA + bitsandbytes
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    batch_size: int = 1
    repeats: int = 10  # per image and epoch (kohya's folder prefix); a 'repeats' column wins
    epochs: int = 1
    max_steps: int | None = None
    resolution: int = 512
    buckets: bool = True
    bucket_step: int = 64
    bucket_upscale: bool = False
    center_crop: bool = False  # square centre crop instead of buckets
    # shrinking an image to its bucket: area: OpenCV's INTER_AREA, as kohya resizes (its
    # default); box: PIL's BOX filter (fulora's until session 25; kohya's
    # --resize_interpolation box). Enlarging is Lanczos either way, as in kohya.
    resize: Literal["area", "box"] = "area"
    clip_skip: int = 2  # kohya semantics: 2 = the penultimate CLIP layer
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"  # on CUDA; CPU runs in fp32
    # auto (the GPU when there is one), cpu, cuda, cuda:N or mps; under accelerate launch,
    # auto or cuda (each process takes its own GPU)
    device: str = "auto"
    seed: int = 1234
    cache_latents: bool = True
    # sample: one draw from the VAE's latent distribution per image (kohya); mean: its mean.
    cached_latent: Literal["sample", "mean"] = "sample"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "default"] = "sdpa"
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    caption_source: Literal["data", "config", "paper"] = "data"
    captions: dict[str, str] = field(default_factory=dict)  # plane -> caption (source config)
    checkpoint_every: int = 0  # steps; 0: only the final weights
    keep_checkpoints: int = 2
    sample_every: int = 0  # steps; 0: only at the end
    sample_steps: int = 20
    sample_guidance: float = 7.0
    sample_seed: int = 1234
    output_name: str = "fulora_lora"
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
