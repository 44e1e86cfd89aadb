"""Run a trained classifier over a manifest: class probabilities and penultimate-layer features.

The features are the input of the model's last linear layer (found by a forward hook, so it
works for every registered architecture and any timm model). They serve as a domain-specific
embedding for the report's t-SNE and for the synthetic-data audit, offline, with no extra
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fulora.classify.train import build_transforms
from fulora.config import resolve_device
from fulora.data.cache import PreprocessCache, default_cache_dir
from fulora.data.dataset import ManifestDataset
from fulora.data.manifest import Manifest
from fulora.errors import ConfigError


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classification layer: its last ``nn.Linear`` module."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear layer to take features from")
    return linears[-1]


def run_classifier(
    model: nn.Module,
    meta: dict[str, Any],
    manifest: Manifest,
    *,
    features: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "predicting",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, C) and, with ``features``, penultimate features (N, D).

    Args:
        model: A classifier from :func:`fulora.classify.train.load_classifier`.
        meta: Its metadata (classes, image size, resize, normalisation).
        manifest: The images; labels may be any plane (they are not used).
        features: Also return the input of the last linear layer.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        cache_dir: Preprocessing cache folder (default: the user cache).
        progress: Show a progress bar.
        desc: Progress bar label.
    """
    dev = resolve_device(device)
    size = int(meta["image_size"])
    cache = PreprocessCache(
        Path(cache_dir) if cache_dir else default_cache_dir() / "preprocessed",
        size=(size, size),
        mode="L",
        resize=meta["resize"],
    )
    _, eval_tf = build_transforms("none", size, meta["normalize"])
    # Labels are not needed here: give every row a valid class so any plane can be embedded.
    unlabelled = manifest.with_values(label=meta["classes"][0])
    dataset = ManifestDataset(
        unlabelled, meta["classes"], cache=cache, channels=3, transform=eval_tf
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = model.to(dev).eval()
    captured: list[torch.Tensor] = []
    hook = None
    if features:
        hook = last_linear(model).register_forward_hook(
            lambda _m, inputs, _o: captured.append(inputs[0].detach().float().flatten(1).cpu())
        )
    probas = []
    try:
        with torch.no_grad():
            for images, _ in tqdm(
                loader, desc=desc, unit="batch", disable=not progress, leave=False
            ):
                with torch.autocast(dev.type, enabled=dev.type == "cuda", dtype=torch.float16):
                    logits = model(images.to(dev))
                probas.append(torch.softmax(logits.float(), 1).cpu().numpy())
    finally:
        if hook is not None:
            hook.remove()
    proba = np.concatenate(probas) if probas else np.zeros((0, len(meta["classes"])))
    feats = torch.cat(captured).numpy() if features and captured else None
    return proba, feats
