"""Figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fulora.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def image_grid(
    path: str | Path,
    rows: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    cell_inches: float = 1.6,
) -> Path:
    """A grid of images (uint8 arrays, grayscale or RGB) with row and column labels.

    Args:
        path: Output PNG.
        rows: Images, row by row (rows may be of different lengths; gaps are blank).
        row_labels: One label per row, left of it.
        col_labels: One label per column, above the first row.
        title: Figure title.
        cell_inches: Width of one cell.
    """
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=1)
    aspect = 0.72
    for row in rows:
        if len(row):
            aspect = row[0].shape[0] / row[0].shape[1]
            break
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(cell_inches * n_cols, cell_inches * aspect * n_rows + 0.4),
        squeeze=False,
    )
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(rows[i]):
                img = rows[i][j]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=10)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(wspace=0.03, hspace=0.05)
    return save_figure(fig, path)
