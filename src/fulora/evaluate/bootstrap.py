"""The patient bootstrap, every replicate at once.

A bootstrap replicate that draws test items with replacement is the test set with a count
per item. Every metric of :func:`~fulora.evaluate.metrics.metrics` is a function of counted
items: accuracy and the confusion matrix are weighted sums, a one-vs-rest AUC is the
Mann-Whitney statistic of weighted pairs. So the metrics of all replicates are a few array
operations on a (replicates x items) count matrix, instead of one ``metrics`` call per
replicate and seed (1000 replicates x 3 seeds x 2 label spaces per results row; the paper
grid's results took minutes). Counts are integers and every AUC numerator a half-integer,
so each value equals the call on the resampled items to the last bit (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fulora.evaluate.metrics import predict, restrict

#: What :func:`~fulora.evaluate.metrics.metrics` returns, in its order.
METRIC_KEYS = (
    "accuracy",
    "recall_macro",
    "recall_weighted",
    "precision_macro",
    "precision_weighted",
    "f1_macro",
    "f1_weighted",
    "auc_macro",
    "paper_auc",
)

#: Replicates scored at once: bounds the (replicates x items) temporaries to a few MB.
_CELLS_PER_CHUNK = 2_000_000


def resample_counts(
    n_items: int,
    groups: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """How often each test item is in each bootstrap replicate, shape (n_resamples, n_items).

    Args:
        n_items: Number of test items.
        groups: A group (patient) per item; whole groups are drawn, so the interval reflects
            patients, not images. None or empty ids: items are drawn.
        n_resamples: Bootstrap replicates.
        seed: Random seed (one draw of groups per replicate, in order).
    """
    if groups is not None and any(groups):
        ids = np.array([g if g else f"__item{i}" for i, g in enumerate(groups)], dtype=object)
        _, group_of = np.unique(ids, return_inverse=True)
        n_groups = int(group_of.max()) + 1
    else:
        group_of, n_groups = np.arange(n_items), n_items
    rng = np.random.default_rng(seed)
    counts = np.empty((n_resamples, n_items), dtype=np.int64)
    for r in range(n_resamples):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        counts[r] = drawn[group_of]
    return counts


def percentile_intervals(
    values: dict[str, np.ndarray], level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """``{name: (low, high)}``: the percentile interval of each metric (NaN replicates skipped)."""
    alpha = (1 - level) / 2
    return {
        name: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha)))
        for name, v in values.items()
        if len(v)  # no replicates (n_bootstrap 0): no interval
    }


def replicate_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    test_labels: Sequence[int],
    space: str,
    counts: np.ndarray,
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`~fulora.evaluate.metrics.metrics` of every replicate, each an array over them.

    Args:
        y_true: True class ids, shape (N,).
        proba: Probabilities over the model's classes, shape (N, C).
        test_labels: The test set's classes (the averaging set), as in ``metrics``.
        space: The label space.
        counts: How often each item is in each replicate, shape (R, N)
            (:func:`resample_counts`; a row of ones is the test set itself).
        keys: The metrics wanted (default: every one ``metrics`` returns).

    Returns:
        ``{key: values}``, each of shape (R,), in %: row ``r`` equals ``metrics`` on the items
        that row counts, each as often as counted.
    """
    y_true = np.asarray(y_true)
    proba = restrict(np.asarray(proba, dtype=float), space, test_labels)
    scored = _Scored(y_true, proba, predict(proba, space, test_labels), list(test_labels))
    wanted = list(METRIC_KEYS if keys is None else keys)
    chunk = max(1, _CELLS_PER_CHUNK // max(len(y_true), 1))
    starts = range(0, max(len(counts), 1), chunk)  # no replicates: empty arrays
    parts = [scored.metrics(counts[i : i + chunk], wanted) for i in starts]
    return {k: np.concatenate([p[k] for p in parts]) for k in wanted}


class _Scored:
    """One model's predictions on a test set, scored under any item counts."""

    def __init__(self, y_true, proba, y_pred, test_labels: list[int]) -> None:
        self.y, self.proba, self.pred, self.labels = y_true, proba, y_pred, test_labels
        self.n_classes = proba.shape[1]
        # One column per (true, predicted) cell: counts @ cells is each replicate's confusion.
        cell = y_true * self.n_classes + y_pred
        self.cells = np.eye(self.n_classes * self.n_classes)[cell]
        self.true_onehot = np.eye(self.n_classes)[y_true]

    def metrics(self, counts: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
        w = counts.astype(float)  # integers: every sum below is exact
        cm = (w @ self.cells).reshape(len(w), self.n_classes, self.n_classes)
        out = {"accuracy": (w @ (self.y == self.pred)) / w.sum(axis=1)}
        out.update(_per_class_averages(cm, self.labels))
        if "auc_macro" in keys:
            out["auc_macro"] = self._auc_macro(np.ascontiguousarray(w.T))
        if "paper_auc" in keys:
            out["paper_auc"] = self._paper_auc(w)
        return {k: 100.0 * out[k] for k in keys}

    def _auc_macro(self, items_by_replicate: np.ndarray) -> np.ndarray:
        """The mean one-vs-rest AUC over the test classes, as ``np.nanmean`` takes it."""
        aucs = np.stack([self._auc(items_by_replicate, c) for c in self.labels], axis=1)
        defined = ~np.isnan(aucs)  # np.nanmean's way, without its warning on all-NaN rows
        n_defined = defined.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(defined, aucs, 0.0).sum(axis=1) / n_defined
        return np.where(n_defined > 0, mean, np.nan)

    def _auc(self, items_by_replicate: np.ndarray, c: int) -> np.ndarray:
        """:func:`~fulora.evaluate.metrics.binary_auc` of class ``c`` in every replicate.

        ``items_by_replicate`` is the counts transposed, (N, R): the sums below run along
        contiguous rows.
        """
        target, score = self.y == c, self.proba[:, c]
        order = np.argsort(score, kind="stable")
        ordered = score[order]
        tie_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        # Each tie group's positive and negative counts; U = pairs ranked right + ties / 2.
        counted = items_by_replicate[order]
        pos = counted * target[order, None]
        neg = counted - pos
        if len(tie_starts) < len(score):
            pos = np.add.reduceat(pos, tie_starts, axis=0)
            neg = np.add.reduceat(neg, tie_starts, axis=0)
        below = np.cumsum(neg, axis=0) - neg
        u = (pos * (below + neg / 2)).sum(axis=0)
        n_pos, n_neg = pos.sum(axis=0), neg.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = u / (n_pos * n_neg)
        undefined = (n_pos == 0) | (n_neg == 0)
        if np.isnan(score).any():
            undefined |= (items_by_replicate[np.isnan(score)] > 0).any(axis=0)
        return np.where(undefined, np.nan, auc)

    def _paper_auc(self, w: np.ndarray) -> np.ndarray:
        """:func:`~fulora.evaluate.metrics.paper_auc` in every replicate (its quirk included)."""
        per_class = w @ self.true_onehot  # (R, C): each class's items in the replicate
        present = per_class > 0
        n_items = w.sum(axis=1)
        # Where the prediction is a class the replicate lacks, it is a positive for every class.
        predicted_absent = ~present[:, self.pred]
        total = np.zeros(len(w))
        for c in range(self.n_classes):
            ones = predicted_absent | (self.pred == c)
            n_pos = per_class[:, c]
            n_ones = (w * ones).sum(axis=1)
            pos_ones = (w * (ones & (self.y == c))).sum(axis=1)
            n_zeros = n_items - n_ones
            rank_sum = (n_pos - pos_ones) * (n_zeros + 1) / 2 + pos_ones * (
                n_zeros + (n_ones + 1) / 2
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n_items - n_pos))
            total += np.where(present[:, c], auc, 0.0)
        n_present = present.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_present >= 2, total / n_present, np.nan)


def _per_class_averages(cm: np.ndarray, labels: list[int]) -> dict[str, np.ndarray]:
    """Macro and support-weighted recall, precision and F1 of each replicate's confusion."""
    tp = cm[:, labels, labels]
    predicted = cm[:, :, labels].sum(axis=1)
    support = cm[:, labels, :].sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    weights = support / np.maximum(support.sum(axis=1, keepdims=True), 1.0)
    out = {}
    for name, values in (("recall", recall), ("precision", precision), ("f1", f1)):
        out[f"{name}_macro"] = values.mean(axis=1)
        out[f"{name}_weighted"] = (values * weights).sum(axis=1)
    return out
