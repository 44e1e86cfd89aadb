"""Classification metrics for models whose label space differs from the test set's.

Models know the five training planes (with ``other``); the African cohort has four. Two label
spaces are reported, and every table says which:

* ``all_outputs`` (the paper's way): the prediction is the argmax over every output, so
  predicting ``other`` on an African image is an error.
* ``test_classes``: the prediction is the argmax over the test set's classes only (their
  probabilities renormalised), i.e. the model is told which planes can occur.

In both, recall, precision and F1 are averaged over the test set's classes (``macro``: plain
mean; ``weighted``: by true support). A class with no predictions has precision 0. The paper's
notebook never shows how it averaged these three; its table's figures fit macro averages over
the four African planes with predictions of ``other`` (absent from that cohort) counted against
no plane's precision, which is what ``precision_macro`` does, so the paper's columns are the
``_macro`` ones. AUC is
one-vs-rest from probabilities, averaged over the test classes: the headline AUC.

``paper_auc`` reproduces, bit for bit, the AUC of every row of the FU-LoRA paper's table: the
notebook's ``roc_auc_score_multiclass`` (``Replicate_All_Planes_Classification.ipynb``, cell
68), one-vs-rest AUC from *hard* predictions for each class present in the test set, then the
plain mean. It is not a ranking AUC, and it has a quirk kept on purpose: a prediction is marked
negative for class ``c`` only when it is *another class present in the test set*, so a
prediction of a class the test set lacks (``other`` on the African cohort) counts as a positive
for every class. A missed image of plane ``c`` predicted ``other`` becomes a hit for ``c``, and
a correct rejection becomes a false alarm for the others; per-class values move by up to 13
points against the plain formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SPACES: tuple[str, ...] = ("all_outputs", "test_classes")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion counts, rows true class, columns predicted class."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def per_class(cm: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each of ``labels`` from a confusion matrix."""
    labels = np.asarray(labels)
    tp = cm[labels, labels].astype(float)
    predicted = cm[:, labels].sum(axis=0).astype(float)
    support = cm[labels, :].sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _auc_from_rank_sum(rank_sum: float, n_pos: int, n_neg: int) -> float:
    """The Mann-Whitney U of the positives' rank sum, scaled to an AUC."""
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_auc(target: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary target, via the Mann-Whitney rank statistic (ties count half).

    Equals :func:`sklearn.metrics.roc_auc_score` (tested) at a fraction of its overhead, which
    matters inside a 1000-resample bootstrap. NaN when only one class is present, or when a
    score is NaN.
    """
    target, score = np.asarray(target, dtype=bool), np.asarray(score)
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(score).any():
        return float("nan")  # one-vs-rest AUC is undefined when a class is absent or everything
    # Tie-averaged ranks, as scipy's rankdata gives them (tested), without its per-call
    # overhead (0.18 ms against 0.04 ms at 217 items): every rank is a half-integer, so the
    # sum is exact whichever way it is taken.
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    starts_tie = np.empty(len(ordered), dtype=bool)
    starts_tie[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_tie[1:])
    starts = np.flatnonzero(starts_tie)
    mean_rank = (starts + np.append(starts[1:], len(ordered)) + 1) / 2
    ranks = mean_rank[np.cumsum(starts_tie) - 1]
    return _auc_from_rank_sum(ranks[target[order]].sum(), n_pos, n_neg)


def paper_auc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The FU-LoRA notebook's ``roc_auc_score_multiclass`` averaged, quirk included (a fraction).

    For each class ``c`` in ``y_true``: the target is ``y_true == c``; the "score" is 0 where
    the prediction is another class present in ``y_true`` and 1 otherwise (so also where it
    is a class absent from ``y_true``); sklearn's ``roc_auc_score`` of the two; then the mean
    over the classes. NaN when ``y_true`` holds fewer than two classes.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    another_present = np.isin(y_pred, present)
    values = [_binary_score_auc(y_true == c, ~another_present | (y_pred == c)) for c in present]
    return float(np.mean(values))


def _binary_score_auc(target: np.ndarray, score: np.ndarray) -> float:
    """:func:`binary_auc` of a 0/1 score, from counts.

    The zeros share ranks 1..n0 and the ones the rest: the same exact rank sum, so the same
    value to the last bit (tested).
    """
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    n_ones = int(score.sum())
    n_zeros = len(score) - n_ones
    pos_ones = int((target & score).sum())
    rank_sum = (n_pos - pos_ones) * (n_zeros + 1) / 2 + pos_ones * (n_zeros + (n_ones + 1) / 2)
    return _auc_from_rank_sum(rank_sum, n_pos, n_neg)


def predict(proba: np.ndarray, space: str, test_labels: Sequence[int]) -> np.ndarray:
    """Predicted class ids under a label space."""
    if space == "all_outputs":
        return proba.argmax(axis=1)
    if space == "test_classes":
        test_labels = np.asarray(test_labels)
        return test_labels[proba[:, test_labels].argmax(axis=1)]
    raise ValueError(f"unknown label space {space!r}; use one of {SPACES}")


def restrict(proba: np.ndarray, space: str, test_labels: Sequence[int]) -> np.ndarray:
    """Probabilities under a label space (renormalised over the test classes if restricted)."""
    if space == "all_outputs":
        return proba
    out = np.zeros_like(proba)
    cols = np.asarray(test_labels)
    sub = proba[:, cols]
    out[:, cols] = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    return out


def metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    test_labels: Sequence[int],
    space: str = "all_outputs",
) -> dict[str, float]:
    """Every headline metric for one label space, as percentages.

    Args:
        y_true: True class ids (indices into the model's classes), shape (N,).
        proba: Model probabilities over all its classes, shape (N, C).
        test_labels: Class ids that occur in the test set (the averaging set).
        space: ``all_outputs`` or ``test_classes``.

    Returns:
        ``accuracy``, ``recall_macro``, ``precision_macro``, ``f1_macro``, the ``_weighted``
        versions, ``auc_macro`` (probabilities) and ``paper_auc`` (the notebook's AUC from
        hard predictions, see :func:`paper_auc`), in %.
    """
    y_true = np.asarray(y_true)
    proba = restrict(np.asarray(proba, dtype=float), space, test_labels)
    y_pred = predict(proba, space, test_labels)
    n_classes = proba.shape[1]
    cm = confusion(y_true, y_pred, n_classes)
    pc = per_class(cm, test_labels)
    weights = pc["support"] / max(pc["support"].sum(), 1.0)
    out = {"accuracy": float((y_true == y_pred).mean())}
    for name in ("recall", "precision", "f1"):
        out[f"{name}_macro"] = float(pc[name].mean())
        out[f"{name}_weighted"] = float((pc[name] * weights).sum())
    aucs = [binary_auc(y_true == c, proba[:, c]) for c in test_labels]
    out["auc_macro"] = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    out["paper_auc"] = paper_auc(y_true, y_pred)
    return {k: 100.0 * v for k, v in out.items()}


def per_class_table(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    test_labels: Sequence[int],
    space: str = "all_outputs",
) -> list[dict[str, float | str]]:
    """One row per test class: support, precision, recall, F1, AUC (in %)."""
    proba = restrict(np.asarray(proba, dtype=float), space, test_labels)
    y_pred = predict(proba, space, test_labels)
    cm = confusion(np.asarray(y_true), y_pred, proba.shape[1])
    pc = per_class(cm, test_labels)
    rows = []
    for i, c in enumerate(test_labels):
        rows.append(
            {
                "class": classes[c],
                "support": int(pc["support"][i]),
                "predicted": int(cm[:, c].sum()),
                "precision": 100 * pc["precision"][i],
                "recall": 100 * pc["recall"][i],
                "f1": 100 * pc["f1"][i],
                "auc": 100 * binary_auc(np.asarray(y_true) == c, proba[:, c]),
            }
        )
    return rows


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """ECE (in %) with equal-width confidence bins, and the bins for a reliability diagram."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    bins = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        if count:
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += count / len(confidence) * abs(acc - conf)
        else:
            conf, acc = float("nan"), float("nan")
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return 100.0 * ece, bins


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n_items: int,
    groups: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every value ``statistic(indices)`` returns.

    Args:
        statistic: Maps an index array (a resample of the test items) to named values.
        n_items: Number of test items.
        groups: A group (patient) per item; whole groups are resampled, so the interval
            reflects patients, not images. None or empty ids: items are resampled.
        n_resamples: Bootstrap replicates.
        seed: Random seed.
        level: Coverage of the interval.

    Returns:
        ``{name: (low, high)}``.
    """
    rng = np.random.default_rng(seed)
    if groups is not None and any(groups):
        ids = np.array([g if g else f"__item{i}" for i, g in enumerate(groups)], dtype=object)
        unique, inverse = np.unique(ids, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(len(unique))]
    else:
        members = [np.array([i]) for i in range(n_items)]
    values: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in pick])
        for name, value in statistic(idx).items():
            values.setdefault(name, []).append(value)
    alpha = (1 - level) / 2
    return {
        name: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha)))
        for name, v in values.items()
    }
