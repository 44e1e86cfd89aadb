"""Figures as PNG files (matplotlib, no display needed).

A base module: every stage draws its figures with these helpers, so it imports nothing of
fulora but ``io`` (see the layers in DEVELOPERS.md).
"""

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
    height = fig.get_size_inches()[1]
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.08 / height)
    # Keep the title's margin constant in inches, whatever the number of rows.
    fig.subplots_adjust(wspace=0.03, hspace=0.05, top=1 - (0.55 if title else 0.3) / height)
    return save_figure(fig, path)


def training_curves(path: str | Path, history: Sequence[dict], *, title: str = "") -> Path:
    """Loss (train and validation) and validation accuracy/F1 per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["val_accuracy"] for r in history], marker="o", label="val accuracy")
    ax2.plot(epochs, [r["val_f1_macro"] for r in history], marker="o", label="val macro F1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("%")
    ax2.set_ylim(0, 100)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_matrix_figure(
    path: str | Path,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts and row shares."""
    matrix = np.asarray(matrix)
    shares = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 1.5, 0.9 * len(row_labels) + 1.2))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{100 * shares[i, j]:.0f}%",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shares[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def reliability_diagram(
    path: str | Path, bins: Sequence[dict], ece: float, *, title: str = ""
) -> Path:
    """Accuracy vs confidence per bin, with the bin counts and the ECE."""
    fig, ax = plt.subplots(figsize=(4, 4))
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    accs = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    ax.bar(centres, accs, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for c, b in zip(centres, bins, strict=True):
        if b["count"]:
            ax.text(c, 0.02, str(b["count"]), ha="center", fontsize=6, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE {ece:.1f}%", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curve(
    path: str | Path,
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    title: str = "",
    smooth: int = 0,
) -> Path:
    """Loss per step with a moving average."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = smooth or max(1, len(losses) // 20)
    if window > 1 and len(losses) >= window:
        kernel = np.ones(window) / window
        ax.plot(
            steps[window - 1 :],
            np.convolve(losses, kernel, mode="valid"),
            lw=1.8,
            label=f"moving average ({window})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
