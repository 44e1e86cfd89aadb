"""The bootstrap's replicates scored at once (``fulora.evaluate.bootstrap``).

Each replicate is a count per test item. Its metrics must be what ``metrics`` gives on the
items repeated as counted (to the last bit: the results tables did not move when the loop
over replicates went), and what scikit-learn gives with the counts as sample weights (a
reference fulora did not write).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from fulora.evaluate.bootstrap import (
    METRIC_KEYS,
    percentile_intervals,
    replicate_metrics,
    resample_counts,
)
from fulora.evaluate.metrics import SPACES, metrics


def _case(seed: int, n: int, present: tuple[int, ...], ties: bool):
    rng = np.random.default_rng(seed)
    y = rng.choice(present, n)
    logits = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[y] * rng.random((n, 1))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(proba, 1) if ties else proba  # rounded: many tied scores


CASES = {
    # name: (seed, items, classes present, tied scores)
    "the African shape": (0, 217, (1, 2, 3, 4), False),
    "every class, tied scores": (1, 120, (0, 1, 2, 3, 4), True),
    "few items: classes drop out of replicates": (2, 9, (1, 2, 3, 4), False),
    "two classes, tied": (3, 30, (2, 3), True),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("space", SPACES)
def test_every_replicate_is_metrics_on_the_items_it_counts(name, space):
    y, proba = _case(*CASES[name])
    labels = sorted(set(y.tolist()))
    counts = resample_counts(len(y), [f"p{i // 2}" for i in range(len(y))], 200, seed=5)
    scored = replicate_metrics(y, proba, labels, space, counts)
    assert list(scored) == list(METRIC_KEYS) == list(metrics(y, proba, labels, space))
    for r, row in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), row)
        expected = metrics(y[idx], proba[idx], labels, space)
        got = {k: float(v[r]) for k, v in scored.items()}
        assert got == pytest.approx(expected, rel=0, abs=0, nan_ok=True), r


@pytest.mark.parametrize("name", ["the African shape", "every class, tied scores"])
def test_replicates_equal_sklearn_with_the_counts_as_sample_weights(name):
    y, proba = _case(*CASES[name])
    labels = sorted(set(y.tolist()))
    counts = resample_counts(len(y), None, 20, seed=2)
    scored = replicate_metrics(y, proba, labels, "all_outputs", counts)
    pred = proba.argmax(1)
    absent = ~np.isin(pred, labels)  # the notebook's quirk: a positive for every class
    for r, weight in enumerate(counts):
        assert scored["accuracy"][r] == pytest.approx(
            100 * accuracy_score(y, pred, sample_weight=weight)
        )
        for average in ("macro", "weighted"):
            p, rec, f, _ = precision_recall_fscore_support(
                y, pred, labels=labels, average=average, sample_weight=weight, zero_division=0
            )
            assert scored[f"precision_{average}"][r] == pytest.approx(100 * p)
            assert scored[f"recall_{average}"][r] == pytest.approx(100 * rec)
            assert scored[f"f1_{average}"][r] == pytest.approx(100 * f)
        aucs = [roc_auc_score(y == c, proba[:, c], sample_weight=weight) for c in labels]
        assert scored["auc_macro"][r] == pytest.approx(100 * np.mean(aucs))
        paper = [roc_auc_score(y == c, (pred == c) | absent, sample_weight=weight) for c in labels]
        assert scored["paper_auc"][r] == pytest.approx(100 * np.mean(paper))


def _loop_intervals(y, proba, labels, space, groups, n_resamples, seed):
    """The bootstrap as fulora ran it until session 23: one ``metrics`` call per replicate,
    each drawing the patients with ``rng.integers`` and concatenating their items."""
    rng = np.random.default_rng(seed)
    ids = np.array(groups, dtype=object)
    unique, inverse = np.unique(ids, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(unique))]
    values: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in pick])
        for name, value in metrics(y[idx], proba[idx], labels, space).items():
            values.setdefault(name, []).append(value)
    alpha = (1 - 0.95) / 2  # 0.025000000000000022, as the loop took it
    return {
        k: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha)))
        for k, v in values.items()
    }


def test_the_intervals_are_the_replicate_loops():
    """The same draws in the same order: experiments resumed across the change keep their
    intervals."""
    y, proba = _case(*CASES["the African shape"])
    labels = sorted(set(y.tolist()))
    groups = [f"p{i // 3}" for i in range(len(y))]
    for space in SPACES:
        counts = resample_counts(len(y), groups, 300, seed=4)
        fast = percentile_intervals(replicate_metrics(y, proba, labels, space, counts))
        assert fast == _loop_intervals(y, proba, labels, space, groups, 300, seed=4)


def test_a_patient_is_drawn_whole():
    groups = ["a", "a", "b", "", "c", "c", "c", ""]  # "": an image without a patient id
    counts = resample_counts(len(groups), groups, 500, seed=0)
    assert counts.shape == (500, 8)
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 4] == counts[:, 6]).all()
    # 5 groups (a, b, c and the two images without an id): each replicate draws 5 of them,
    # and an item is there as often as its group was drawn
    assert (counts[:, [0, 2, 3, 4, 7]].sum(axis=1) == 5).all()
    assert (counts[:, 3] != counts[:, 7]).any()  # no id: its own group, not one shared group
    assert (resample_counts(8, groups, 500, seed=0) == counts).all()
    assert (resample_counts(8, None, 500, seed=0).sum(axis=1) == 8).all()


def test_no_replicates_give_no_interval():
    y, proba = _case(*CASES["few items: classes drop out of replicates"])
    counts = resample_counts(len(y), None, 0)
    assert counts.shape == (0, len(y))
    scored = replicate_metrics(y, proba, [1, 2, 3, 4], "all_outputs", counts, ["accuracy"])
    assert scored["accuracy"].shape == (0,)
    assert percentile_intervals(scored) == {}
