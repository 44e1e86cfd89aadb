"""The configuration of ``fulora audit`` (and the audit section of an experiment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fulora.config import AT_LEAST_0, AT_LEAST_1, FRACTION, SEED, Checked, Range
from fulora.errors import ConfigError


@dataclass
class AuditConfig(Checked):
    """Configuration of ``fulora audit``."""

    RANGES = {
        "image_size": Range(16),  # SSIM's 11-px window needs room
        "shortlist": AT_LEAST_1,
        "near_copy_ssim": Range(-1, 1),
        "near_copy_cosine": Range(-1, 1),
        "kid_subsets": AT_LEAST_1,
        "kid_subset_size": Range(2),
        "prc_neighborhood": AT_LEAST_1,
        "min_confidence": FRACTION,
        "gallery": AT_LEAST_0,
        "seed": SEED,
    }

    extractor: Literal["auto", "classifier", "inception"] = "auto"  # auto: classifier if given
    classifier: str | None = None  # a `fulora classify train` run trained on real images
    # More `fulora classify train` runs on real images (other seeds): the filter's rules then
    # use the mean of their and --classifier's probabilities, so one seed does not decide.
    ensemble: list[str] = field(default_factory=list)
    inception_weights: str | None = None  # torch-fidelity's Inception-v3 .pth, for offline use
    image_size: int = 128  # side of the aligned grayscale images compared by SSIM
    shortlist: int = 8  # SSIM candidates per image (by coarse pixel correlation)
    near_copy_ssim: float = 0.9  # SSIM at or above which a synthetic image is a near-copy
    # Embedding cosine (of features centred on the training mean) flags too only when set: a
    # classifier's features cluster by class, so different images of one plane score near 1
    # (see similarity.png); pixels decide by default.
    near_copy_cosine: float | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    drop_near_copies: bool = True  # filter rule
    require_agreement: bool = True  # filter rule: the classifier's label is the prompted plane
    min_confidence: float = 0.5  # filter rule: its probability of the prompted plane
    gallery: int = 8  # most similar pairs shown
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    cache_dir: str | None = None  # preprocessing cache folder
    seed: int = 0

    def check(self) -> None:
        """An ensemble labels with --classifier's probabilities too, so it needs one."""
        if self.ensemble and not self.classifier:
            raise ConfigError(
                "'ensemble' needs 'classifier' (--classifier RUN_DIR): the ensemble's runs "
                "are averaged with it"
            )
