"""``paper_auc`` against the FU-LoRA notebook's own AUC function (issue 17, metrics).

``notebook_roc_auc_score_multiclass`` below follows ``roc_auc_score_multiclass`` in
``Replicate_All_Planes_Classification.ipynb`` (github.com/13204942/FU-LoRA, cell 68) and the
averaging of cell 70, rewritten here line by line with sklearn's ``roc_auc_score``, the
function the notebook calls. Predictions are rebuilt from hand-made confusion matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fulora.evaluate.metrics import metrics, paper_auc


def notebook_roc_auc_score_multiclass(actual, pred) -> float:
    classes = set(actual)
    per_class = {}
    for c in classes:
        others = [x for x in classes if x != c]
        new_actual = [0 if x in others else 1 for x in actual]
        new_pred = [0 if x in others else 1 for x in pred]
        per_class[c] = roc_auc_score(new_actual, new_pred, average="macro")
    total = 0
    for value in per_class.values():
        total += value
    return total / len(per_class)


def _from_confusion(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows: true classes 1-4 (the African planes); columns: predicted 0-4 (0 = other)."""
    y_true, y_pred = [], []
    for true, counts in enumerate(rows, start=1):
        for pred, n in enumerate(counts):
            y_true += [true] * n
            y_pred += [pred] * n
    return np.array(y_true), np.array(y_pred)


MATRICES = {
    "many other predictions": [
        [30, 50, 5, 5, 10],
        [25, 10, 60, 3, 2],
        [40, 2, 1, 55, 2],
        [35, 5, 5, 5, 50],
    ],
    "few other predictions": [
        [2, 80, 8, 5, 5],
        [1, 10, 85, 2, 2],
        [0, 5, 5, 88, 2],
        [3, 4, 4, 4, 85],
    ],
    "no other predictions": [
        [0, 70, 10, 10, 10],
        [0, 10, 80, 5, 5],
        [0, 5, 5, 85, 5],
        [0, 10, 10, 5, 75],
    ],
    "a class never predicted": [
        [10, 60, 30, 0, 0],
        [5, 20, 75, 0, 0],
        [20, 40, 40, 0, 0],
        [5, 5, 5, 0, 85],
    ],
    "everything other": [[20, 0, 0, 0, 0], [15, 0, 0, 0, 0], [10, 0, 0, 0, 0], [5, 0, 0, 0, 0]],
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_paper_auc_equals_the_notebooks_function(name):
    y_true, y_pred = _from_confusion(MATRICES[name])
    expected = notebook_roc_auc_score_multiclass(list(y_true), list(y_pred))
    assert paper_auc(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_the_quirk_other_counts_as_a_hit_for_every_plane():
    """Three class-1 images right, two class-2 images called 3, the class-3 image called other
    (0): the notebook credits that other-prediction as a class-3 hit (and a false alarm for
    1 and 2), so its AUC differs from a plain one-vs-rest AUC of the same predictions."""
    y_true = np.array([1, 1, 1, 2, 2, 3])
    y_pred = np.array([1, 1, 1, 3, 3, 0])
    plain = np.mean([roc_auc_score(y_true == c, y_pred == c) for c in (1, 2, 3)])
    assert paper_auc(y_true, y_pred) == pytest.approx(0.66944444, abs=1e-8)
    assert plain == pytest.approx(0.6)
    assert paper_auc(y_true, y_pred) == pytest.approx(
        notebook_roc_auc_score_multiclass(list(y_true), list(y_pred)), abs=1e-12
    )


def test_metrics_reports_the_notebook_auc_in_the_paper_label_space():
    y_true, y_pred = _from_confusion(MATRICES["many other predictions"])
    proba = np.full((len(y_pred), 5), 0.01)
    proba[np.arange(len(y_pred)), y_pred] = 0.96  # argmax = the hand-made prediction
    result = metrics(y_true, proba, test_labels=[1, 2, 3, 4], space="all_outputs")
    expected = 100 * notebook_roc_auc_score_multiclass(list(y_true), list(y_pred))
    assert result["paper_auc"] == pytest.approx(expected, abs=1e-10)
