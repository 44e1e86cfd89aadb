"""fulora.figures: every figure is a readable PNG, written atomically, for usual and edge inputs."""

import numpy as np
import pytest
from PIL import Image

from fulora.figures import (
    confusion_matrix_figure,
    image_grid,
    loss_curve,
    reliability_diagram,
    training_curves,
)


def _epochs(n, validation=True):
    return [
        {
            "epoch": e + 1,
            "train_loss": 1.0 / (e + 1),
            "val_loss": 1.2 / (e + 1) if validation else None,
            "val_accuracy": 50.0 + e if validation else None,
            "val_f1_macro": 40.0 + e if validation else None,
        }
        for e in range(n)
    ]


def _bins(counts):
    edges = np.linspace(0, 1, len(counts) + 1)
    return [
        {"low": lo, "high": hi, "count": c, "accuracy": 0.5 if c else None}
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


CASES = {
    "training curves": lambda p: training_curves(p, _epochs(5), title="resnet18 (none)"),
    "training curves, one epoch": lambda p: training_curves(p, _epochs(1)),
    # the paper preset trains without a validation set: its val columns are empty
    "training curves, no validation": lambda p: training_curves(p, _epochs(3, False)),
    "confusion matrix 5 x 4": lambda p: confusion_matrix_figure(
        p, np.arange(20).reshape(5, 4), list("abcde"), list("abcd"), title="t"
    ),
    "confusion matrix with an empty row": lambda p: confusion_matrix_figure(
        p, np.array([[0, 0], [3, 1]]), ["x", "y"], ["x", "y"]
    ),
    "confusion matrix 1 x 1": lambda p: confusion_matrix_figure(p, np.array([[7]]), ["a"], ["a"]),
    "reliability diagram": lambda p: reliability_diagram(p, _bins([3, 0, 5, 9]), 4.2),
    "reliability diagram, no bins": lambda p: reliability_diagram(p, [], 0.0),
    "loss curve": lambda p: loss_curve(p, list(range(1, 101)), list(np.linspace(1, 0.1, 100))),
    "loss curve, one step": lambda p: loss_curve(p, [1], [0.5]),
    "loss curve, window longer than the run": lambda p: loss_curve(p, [1, 2], [1.0, 0.9], smooth=5),
    "image grid with labels": lambda p: image_grid(
        p,
        [[np.full((16, 20), 30 * i, np.uint8) for i in range(3)] for _ in range(2)],
        row_labels=["real", "synthetic"],
        col_labels=["a", "b", "c"],
        title="grid",
    ),
    "image grid, one cell": lambda p: image_grid(p, [[np.zeros((8, 8), np.uint8)]]),
}


@pytest.mark.parametrize("draw", CASES.values(), ids=CASES.keys())
def test_each_figure_is_a_png_written_atomically(tmp_path, draw):
    path = draw(tmp_path / "figure.png")
    assert path == tmp_path / "figure.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 50 and img.height > 50
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temporary file left
