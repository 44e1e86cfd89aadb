"""Feature extractors for the audit: Inception-v3 (FID's standard) or one of our classifiers.

Inception features make FID/KID comparable with the literature but need torch-fidelity's
Inception weights (``weights-inception-2015-12-05-6726825d.pth``), which cannot be downloaded
offline. A classifier trained by ``fulora classify train`` gives a domain-specific extractor
(its penultimate layer) that always works offline; its numbers are comparable only between
audits that use the same classifier.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from fulora.classify.features import run_classifier
from fulora.classify.registry import _network_reachable
from fulora.classify.train import load_classifier
from fulora.config import resolve_device
from fulora.data.images import load_image, resize_image
from fulora.data.manifest import Manifest
from fulora.errors import ConfigError

logger = logging.getLogger("fulora")


class ClassifierExtractor:
    """Penultimate-layer features (and class probabilities) of a trained classifier."""

    def __init__(
        self, run_dir: str | Path, device: str = "auto", cache_dir: str | Path | None = None
    ):

        self.run_dir = Path(run_dir)
        self.model, self.meta = load_classifier(run_dir)
        self.device = device
        self.cache_dir = cache_dir
        self.name = f"classifier {self.meta['arch']} ({self.run_dir})"

    @property
    def classes(self) -> list[str]:
        """The classifier's planes."""
        return list(self.meta["classes"])

    def run(self, manifest: Manifest, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), probabilities (N, C)) of the images."""
        proba, feats = run_classifier(
            self.model,
            self.meta,
            manifest,
            features=True,
            device=self.device,
            cache_dir=self.cache_dir,
            desc=desc,
        )
        assert feats is not None
        return feats, proba

    def features(self, manifest: Manifest, desc: str = "features") -> np.ndarray:
        """Features (N, D) of the images."""
        return self.run(manifest, desc)[0]


def inception_weights(path: str | Path | None = None) -> Path | None:
    """The Inception weights file to use: ``path``, the torch hub cache, or None (download).

    Raises:
        ConfigError: If no file is given or cached and the download host cannot be reached.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"Inception weights file {path} does not exist")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name
    if cached.is_file():
        return cached
    if _network_reachable(URL_INCEPTION_V3):
        return None
    raise ConfigError(
        f"the Inception extractor needs torch-fidelity's Inception-v3 weights ({cached.name}), "
        f"which are not in the torch cache ({cached.parent}) and "
        f"{urlparse(URL_INCEPTION_V3).hostname} cannot be reached. Download "
        f"{URL_INCEPTION_V3} elsewhere and pass --inception-weights "
        "PATH (or copy it into that folder), or use a domain-specific extractor that works "
        "offline: --extractor classifier --classifier RUN_DIR (a `fulora classify train` run)"
    )


class InceptionExtractor:
    """torch-fidelity's Inception-v3 pool features (2048-D), the FID standard."""

    def __init__(
        self, weights: str | Path | None = None, device: str = "auto", batch_size: int = 32
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights(weights)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048"],
            feature_extractor_weights_path=str(path) if path else None,
        )
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.name = "Inception-v3 (torch-fidelity, pool3 2048-D)"

    def features(self, manifest: Manifest, desc: str = "inception") -> np.ndarray:
        """Features (N, 2048) of the images (grayscale repeated to RGB, resized to 299)."""
        out = []
        paths = manifest.paths
        for start in tqdm(range(0, len(paths), self.batch_size), desc=desc, leave=False):
            batch = [
                np.asarray(resize_image(load_image(p, "RGB", row=start + i), (299, 299)))
                for i, p in enumerate(paths[start : start + self.batch_size])
            ]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            with torch.no_grad():
                out.append(self.model(x.to(self.device))[0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)
