"""t-SNE of classifier embeddings per plane, coloured by source (the paper's second notebook).

Each plane gets its own 2-D t-SNE of the penultimate-layer features of one trained classifier
for three groups of images: real training images, synthetic images and the target cohort. Where
the synthetic cloud overlaps the target cohort more than the real one does, the synthetic data
widened the training distribution towards the unseen site.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fulora.classify.features import run_classifier  # noqa: E402
from fulora.classify.train import load_classifier  # noqa: E402
from fulora.data.manifest import Manifest  # noqa: E402
from fulora.figures import save_figure  # noqa: E402

GROUP_COLOURS = {"real training": "#1f77b4", "synthetic": "#ff7f0e", "target cohort": "#2ca02c"}


def embedding_figure(
    path: str | Path,
    model_dir: str | Path,
    groups: dict[str, Manifest],
    *,
    per_group: int = 120,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    title: str = "",
) -> Path | None:
    """Write a per-plane t-SNE figure; None when no plane has two groups with 5+ images.

    Args:
        path: Output PNG.
        model_dir: A classifier run folder (its ``best.pt`` gives the features).
        groups: Name -> images (e.g. real training, synthetic, target cohort).
        per_group: At most this many images per plane and group (a seeded sample).
        seed: Seed of the sampling and of t-SNE.
        cache_dir: Preprocessing cache.
        device: Where the classifier runs.
        title: Figure title.
    """
    from sklearn.manifold import TSNE

    model, meta = load_classifier(model_dir)
    planes = [p for p in meta["classes"] if any(p in set(m.labels) for m in groups.values())]
    rng = np.random.default_rng(seed)
    panels = []
    for plane in planes:
        parts = []
        for name, manifest in groups.items():
            rows = np.flatnonzero(manifest.frame["label"].to_numpy() == plane)
            if len(rows) > per_group:
                rows = np.sort(rng.choice(rows, per_group, replace=False))
            if len(rows) >= 5:
                parts.append((name, manifest.subset(np.isin(np.arange(len(manifest)), rows))))
        if len(parts) >= 2:
            panels.append((plane, parts))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, (plane, parts) in zip(axes[0], panels, strict=True):
        feats, names = [], []
        for name, subset in parts:
            _, f = run_classifier(
                model,
                meta,
                subset,
                features=True,
                device=device,
                cache_dir=cache_dir,
                progress=False,
            )
            feats.append(f)
            names += [name] * len(subset)
        x = np.concatenate(feats)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        names_arr = np.array(names)
        for name, _ in parts:
            mask = names_arr == name
            ax.scatter(
                xy[mask, 0],
                xy[mask, 1],
                s=9,
                alpha=0.7,
                label=f"{name} ({mask.sum()})",
                color=GROUP_COLOURS.get(name),
            )
        ax.set_title(plane)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
