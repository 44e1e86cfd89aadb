import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from fulora.evaluate.metrics import (
    binary_auc,
    expected_calibration_error,
    metrics,
    per_class_table,
    predict,
)


def _random_case(seed, n=200, classes=5, present=(0, 1, 2, 3, 4)):
    rng = np.random.default_rng(seed)
    y = rng.choice(present, n)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[y] * rng.random((n, 1))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("present", [(0, 1, 2, 3, 4), (1, 2, 3, 4)])
def test_against_sklearn(seed, present):
    y, proba = _random_case(seed, present=present)
    labels = sorted(set(y.tolist()))
    m = metrics(y, proba, labels, "all_outputs")
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(y, pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y, pred, labels=labels, average=average, zero_division=0
        )
        assert m[f"precision_{average}"] == pytest.approx(100 * p)
        assert m[f"recall_{average}"] == pytest.approx(100 * r)
        assert m[f"f1_{average}"] == pytest.approx(100 * f)
    auc = np.mean([roc_auc_score(y == c, proba[:, c]) for c in labels])
    assert m["auc_macro"] == pytest.approx(100 * auc)
    # The notebook's AUC: a prediction of a class absent from y is a positive for every class
    # (tests/evaluate/test_paper_auc.py checks it against the notebook's own function).
    absent = ~np.isin(pred, labels)
    paper = np.mean([roc_auc_score(y == c, (pred == c) | absent) for c in labels])
    assert m["paper_auc"] == pytest.approx(100 * paper)


@pytest.mark.parametrize("seed", range(4))
def test_binary_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    target = rng.random(300) < 0.3
    score = rng.integers(0, 5, 300).astype(float)  # many ties
    assert binary_auc(target, score) == pytest.approx(roc_auc_score(target, score))
    assert np.isnan(binary_auc(np.zeros(5, bool), np.arange(5.0)))
    assert np.isnan(binary_auc(target, np.where(score > 3, np.nan, score)))  # sklearn raises on NaN


@pytest.mark.parametrize("kind", ["continuous", "rounded", "binary"])
def test_auc_rank_sums_equal_scipys_rankdata_to_the_last_bit(kind):
    """binary_auc ranks with numpy, and a 0/1 score (the paper's AUC) is counted: both must
    give what the Mann-Whitney formula on scipy's tie-averaged ranks gives, bit for bit, so
    that no table moved when scipy's rankdata left the bootstrap (its cost, session 20)."""
    from scipy.stats import rankdata

    from fulora.evaluate.metrics import _binary_score_auc

    rng = np.random.default_rng(["continuous", "rounded", "binary"].index(kind))
    for n in rng.integers(2, 300, 200):
        target = rng.random(n) < rng.random()
        score = {"continuous": rng.random(n), "rounded": np.round(rng.random(n), 1)}.get(
            kind, (rng.random(n) < 0.5).astype(float)
        )
        n_pos = int(target.sum())
        if n_pos in (0, n):
            continue
        scipy_auc = (rankdata(score)[target].sum() - n_pos * (n_pos + 1) / 2) / (
            n_pos * (n - n_pos)
        )
        assert binary_auc(target, score) == scipy_auc
        if kind == "binary":
            assert _binary_score_auc(target, score.astype(bool)) == scipy_auc


def test_test_set_without_a_class_the_model_knows():
    """Class 0 ('other') is known to the model but absent from the test set."""
    classes = ["other", "brain", "femur"]
    y = np.array([1, 1, 2, 2])
    proba = np.array(
        [
            [0.6, 0.3, 0.1],  # predicts 'other': wrong with all outputs, 'brain' when restricted
            [0.1, 0.8, 0.1],
            [0.1, 0.2, 0.7],
            [0.2, 0.1, 0.7],
        ]
    )
    full = metrics(y, proba, [1, 2], "all_outputs")
    restricted = metrics(y, proba, [1, 2], "test_classes")
    assert full["accuracy"] == 75.0 and restricted["accuracy"] == 100.0
    assert full["recall_macro"] == 75.0  # brain 1/2, femur 2/2
    assert full["precision_macro"] == 100.0  # 'other' predictions do not count against a class
    assert list(predict(proba, "test_classes", [1, 2])) == [1, 1, 2, 2]
    rows = per_class_table(y, proba, classes, [1, 2], "all_outputs")
    assert [r["class"] for r in rows] == ["brain", "femur"]
    assert rows[0]["recall"] == 50.0 and rows[0]["support"] == 2


def test_class_with_no_predictions_has_zero_precision():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # never predicts 1
    m = metrics(y, proba, [0, 1])
    assert m["precision_macro"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert m["recall_macro"] == 50.0
    assert m["paper_auc"] == 50.0  # hard predictions carry no information
    assert m["auc_macro"] == 100.0  # but the probabilities rank perfectly


def test_expected_calibration_error_hand_case():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0])
    ece, bins = expected_calibration_error(confidence, correct, n_bins=10)
    # bin 0.9-1.0: |1 - 0.95| = 0.05, half the items; bin 0.5-0.6: |0.5 - 0.55| = 0.05
    assert ece == pytest.approx(5.0)
    assert sum(b["count"] for b in bins) == 4
