"""The LoRA's training data: captions, aspect-ratio buckets, the dataset and its batches.

kohya-ss's data path as fulora implements it: a caption per image (from the data, a caption file
or the plane's prompt), each image in the bucket closest to its aspect ratio without upscaling,
batches drawn from one bucket at a time in an order seeded by (seed, epoch), and the VAE's latents
computed once per image when ``cache_latents`` is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from fulora.data.images import image_info, load_image
from fulora.data.manifest import Manifest
from fulora.errors import ConfigError, DataError
from fulora.lora.buckets import (
    BucketChoice,
    center_square,
    fit_to_bucket,
    make_buckets,
    select_bucket,
)
from fulora.lora.conditioning import token_ids
from fulora.planes import PAPER_CAPTIONS, check_planes

if TYPE_CHECKING:
    from fulora.lora.config import LoraTrainConfig

logger = logging.getLogger("fulora")

#: The manifest columns LoRA training reads (its stage key fingerprints only these).
LORA_COLUMNS = ("path", "label", "caption", "repeats")


@dataclass
class Example:
    """One training image with its caption and bucket."""

    path: str
    label: str
    caption: str
    bucket: tuple[int, int]  # (width, height)
    repeats: int
    resized: tuple[int, int] = (0, 0)  # the size it is resized to before trimming to the bucket

    @property
    def bucket_name(self) -> str:
        """The bucket as kohya names it: ``WIDTHxHEIGHT``."""
        return f"{self.bucket[0]}x{self.bucket[1]}"


def captions_for(manifest: Manifest, cfg: LoraTrainConfig) -> list[str]:
    """The caption of every row, per ``cfg.caption_source``; errors name what is missing."""
    labels = manifest.labels
    if cfg.caption_source == "paper":
        return [PAPER_CAPTIONS[label] for label in labels]
    if cfg.caption_source == "config":
        planes = check_planes(cfg.captions)
        known = dict(zip(planes, cfg.captions.values(), strict=True))
        missing = sorted(set(labels) - set(known))
        if missing:
            raise ConfigError(
                f"captions: no caption for plane(s) {', '.join(missing)}; add them under "
                "'captions' in the config or use caption_source: data"
            )
        return [known[label] for label in labels]
    if "caption" not in manifest.frame.columns:
        raise DataError(
            f"{manifest.origin} has no captions: put a caption file (e.g. "
            "duplicate_text_for_each_image.txt) in each plane folder, add a 'caption' column, "
            "or set caption_source: paper or config"
        )
    captions = [str(c).strip() for c in manifest.frame["caption"]]
    for row, caption in enumerate(captions):
        if not caption:
            folder = Path(manifest.paths[row]).parent
            raise DataError(
                f"no caption for {manifest.paths[row]}: the plane folder {folder} has no caption "
                "file (e.g. duplicate_text_for_each_image.txt) and the image no <name>.txt; add "
                "one, or set caption_source: paper or config"
            )
    return captions


def build_examples(manifest: Manifest, cfg: LoraTrainConfig) -> list[Example]:
    """Examples with captions and buckets; reads every image header (errors name the file)."""
    if len(manifest) == 0:
        raise DataError(f"no training images in {manifest.origin or 'the data'}")
    manifest = manifest.drop_duplicate_paths("LoRA training (use repeats to weight an image)")
    captions = captions_for(manifest, cfg)
    repeats = manifest.frame["repeats"] if "repeats" in manifest.frame.columns else None
    out = []
    labels = manifest.labels
    for row, path in enumerate(manifest.paths):
        if not path.is_file():
            raise DataError(f"training image {path} (row {row}) does not exist")
        size, _ = image_info(path)
        choice = _bucket_for(size, cfg, path)
        rep = cfg.repeats
        if repeats is not None and str(repeats.iloc[row]).strip():
            rep = int(float(repeats.iloc[row]))
        out.append(
            Example(str(path), labels[row], captions[row], choice.bucket, rep, choice.resized)
        )
    return out


def _bucket_for(size: tuple[int, int], cfg: LoraTrainConfig, path: Path) -> BucketChoice:
    """Kohya's bucket of one image, or the square of side ``resolution`` without buckets."""
    if cfg.center_crop or not cfg.buckets:
        side = cfg.resolution
        scale = max(side / size[0], side / size[1])
        cover = (max(side, int(size[0] * scale + 0.5)), max(side, int(size[1] * scale + 0.5)))
        return BucketChoice((side, side), cover)
    # kohya's default bucket range: sides from resolution/2 to 2*resolution (256-1024 at 512).
    buckets = make_buckets(
        cfg.resolution,
        cfg.bucket_step,
        min_side=max(cfg.bucket_step, cfg.resolution // 2),
        max_side=cfg.resolution * 2,
    )
    try:
        return select_bucket(
            size,
            resolution=cfg.resolution,
            step=cfg.bucket_step,
            upscale=cfg.bucket_upscale,
            buckets=buckets,
        )
    except ValueError as err:
        raise DataError(
            f"training image {path}: {err}; remove it, or set a smaller bucket_step "
            f"(--bucket-step) or a larger resolution (--resolution; now {cfg.resolution})"
        ) from None


class ImageCaptions(Dataset):
    """Pixels (3, H, W) in [-1, 1] at each example's bucket, and token ids of its caption."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        center_crop: bool,
        resolution: int,
        resize: str = "area",
    ):
        self.examples = examples
        self.center_crop = center_crop
        self.resolution = resolution
        self.resize = resize  # how a bucket shrinks an image: "area" (kohya's) or "box"
        self.ids = token_ids(tokenizer, [e.caption for e in examples])
        self.latents: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, i: int) -> torch.Tensor:
        """The image, bucketed, as a tensor in [-1, 1]."""
        example = self.examples[i]
        img = load_image(example.path, "RGB", row=i)
        img = (
            center_square(img, self.resolution)
            if self.center_crop
            else fit_to_bucket(img, BucketChoice(example.bucket, example.resized), self.resize)
        )
        array = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)
        return array / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i]}
        if self.latents is not None:
            item["latents"] = self.latents[i]
        else:
            item["pixels"] = self.pixels(i)
        return item


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one bucket each; order drawn from (seed, epoch) so resume repeats it."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to produce."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, example in enumerate(self.examples):
            by_bucket.setdefault(example.bucket, []).extend([i] * example.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            order = torch.randperm(len(items), generator=generator).tolist()
            shuffled = [items[k] for k in order]
            batches += [
                shuffled[k : k + self.batch_size] for k in range(0, len(shuffled), self.batch_size)
            ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in order]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack one bucket's items (same size) into a batch."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def cache_latents(vae, dataset: ImageCaptions, cfg: LoraTrainConfig, device, progress: bool):
    """Each image's latent, encoded once: a draw from the VAE's distribution, or its mean.

    kohya caches ``latent_dist.sample()``; the draw of image ``i`` is seeded by (seed, i) so a
    rerun caches the same latents.
    """
    scaling = vae.config.scaling_factor
    latents = []
    with torch.no_grad():
        for i in tqdm(
            range(len(dataset)),
            desc="caching latents",
            unit="img",
            disable=not progress,
            leave=False,
        ):
            dist = vae.encode(dataset.pixels(i).unsqueeze(0).to(device)).latent_dist
            latent = dist.mean
            if cfg.cached_latent == "sample":
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_033 + i)
                noise = torch.randn(dist.mean.shape, generator=generator)
                latent = dist.mean + dist.std * noise.to(device, dist.mean.dtype)
            latents.append(latent[0].cpu() * scaling)
    return latents
