"""Nearest neighbours of synthetic images among the LoRA training images.

Two views of "is this a copy?": cosine similarity of embeddings (what a network sees) and SSIM
of the aligned images (what a person sees: grayscale, stretched to one square size). SSIM is
computed by torchmetrics against a shortlist per image: the ``shortlist`` training images most
correlated in pixels at a coarse size, plus the embedding nearest neighbour; an exact or light
copy is always the most correlated image, so the shortlist loses nothing that matters and keeps
the cost linear in the number of training images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fulora.data.images import load_image, resize_image
from fulora.data.manifest import Manifest


def _stretch(pixels: np.ndarray) -> np.ndarray:
    """Smooth lightly, then map the 5th-99.5th percentiles to [0, 1].

    Gain, brightness and sensor noise do not make a new image: ultrasound is mostly black
    background, where SSIM's luminance term turns an offset of a few grey levels into a large
    relative change; the 5th percentile is the background level of such images.
    """
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(pixels, 1.0)
    low, high = np.percentile(smooth, [5, 99.5])
    return np.clip((smooth - low) / max(high - low, 1e-6), 0, 1)


def aligned_pixels(manifest: Manifest, size: int = 128, desc: str = "pixels") -> torch.Tensor:
    """Images aligned for comparison, (N, 1, size, size) floats in [0, 1].

    Grayscale, stretched to ``size`` x ``size``, smoothed and normalised per image (so a copy
    with its gain turned up or noise added is still recognised as a copy).
    """
    arrays = [
        _stretch(np.asarray(resize_image(load_image(p, "L", row=i), (size, size)), np.float32))
        for i, p in enumerate(tqdm(manifest.paths, desc=desc, leave=False))
    ]
    if not arrays:
        return torch.zeros((0, 1, size, size))
    return torch.from_numpy(np.stack(arrays).astype(np.float32)).unsqueeze(1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).double(), dim=1)


def cosine_nearest(
    queries: np.ndarray, keys: np.ndarray, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of each query's nearest key.

    Args:
        queries: (N, D) embeddings.
        keys: (M, D) embeddings.
        exclude: Optional (N, M) boolean mask of pairs not allowed (e.g. the same image).
    """
    sim = _unit(torch.from_numpy(np.asarray(queries))) @ _unit(torch.from_numpy(np.asarray(keys))).T
    if exclude is not None:
        sim[torch.from_numpy(exclude)] = -2.0
    best = sim.max(dim=1)
    return best.indices.numpy(), best.values.numpy()


def ssim_nearest(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    extra: Sequence[int] | np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    shortlist: int = 8,
    coarse: int = 32,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Index and SSIM of each query's most similar key (see the module docstring).

    Args:
        queries: (N, 1, S, S) aligned images in [0, 1].
        keys: (M, 1, S, S) aligned images in [0, 1].
        extra: One more candidate per query (e.g. its embedding neighbour).
        exclude: Optional (N, M) boolean mask of pairs not allowed.
        shortlist: Candidates per query by coarse pixel correlation.
        coarse: Side of the coarse images used for the shortlist.
        batch: Pairs per SSIM call.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    n, m = len(queries), len(keys)
    if n == 0 or m == 0:
        return np.zeros(0, int), np.zeros(0)
    small_q = F.adaptive_avg_pool2d(queries, coarse).flatten(1)
    small_k = F.adaptive_avg_pool2d(keys, coarse).flatten(1)
    corr = (
        _unit(small_q - small_q.mean(1, keepdim=True))
        @ _unit(small_k - small_k.mean(1, keepdim=True)).T
    )
    if exclude is not None:
        corr[torch.from_numpy(exclude)] = -2.0
    k = min(shortlist, m)
    candidates = corr.topk(k, dim=1).indices.numpy()
    if extra is not None:
        candidates = np.concatenate([candidates, np.asarray(extra).reshape(-1, 1)], axis=1)
    pairs = [(i, int(j)) for i in range(n) for j in dict.fromkeys(candidates[i].tolist())]
    if exclude is not None:
        pairs = [(i, j) for i, j in pairs if not exclude[i, j]]
    values = np.empty(len(pairs))
    # SSIM's Gaussian window is a one-channel 11x11 convolution, which oneDNN runs slowly on a
    # CPU: without it (PyTorch's own kernel) an SSIM call took 0.57 s instead of 1.71 s for 256
    # pairs of 128 px on a 2-core AMD EPYC, the same SSIM to 1.5e-6 (float rounding). Only the
    # `enabled` flag changes; None leaves the other oneDNN settings as they are.
    with torch.backends.mkldnn.flags(
        enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None
    ):
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            qi = torch.tensor([i for i, _ in chunk])
            kj = torch.tensor([j for _, j in chunk])
            values[start : start + len(chunk)] = (
                ssim(queries[qi], keys[kj], data_range=1.0, reduction="none").double().numpy()
            )
    best_index = np.full(n, -1)
    best_value = np.full(n, -np.inf)
    for (i, j), v in zip(pairs, values, strict=True):
        if v > best_value[i]:
            best_index[i], best_value[i] = j, v
    return best_index, best_value


def same_image_or_patient(manifest: Manifest) -> np.ndarray:
    """(N, N) mask of pairs that are the same image or the same (known) patient."""
    patients = np.array([str(p) for p in manifest.frame["patient"]], dtype=object)
    same = (patients[:, None] == patients[None, :]) & (patients[:, None] != "")
    same |= np.eye(len(manifest), dtype=bool)
    return same
