"""One evaluation's bootstrap: fulora's AUC against scipy's and scikit-learn's, same process.

``evaluate_predictions`` computes every headline metric on 1000 patient resamples in both
label spaces (2,000 calls of ``metrics``), and most of a call was the one-vs-rest AUCs. This
times one evaluation of the African cohort's shape (217 images, 4 of the model's 5 planes, 2
images per patient, random probabilities) three ways, in this process:

* fulora: tie-averaged ranks with numpy, the paper's AUC from counts (``metrics.py``);
* scipy: the same formula on ``scipy.stats.rankdata`` (fulora's code until session 20);
* sklearn: ``sklearn.metrics.roc_auc_score`` for both AUCs, the obvious way to write it.

and checks that the three give the same intervals.

Usage: python benchmarks/bench_evaluate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager

import numpy as np
from bench_cli import cpu_name  # benchmarks/ is the script's folder, first on sys.path
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

import fulora.evaluate.metrics as metrics_module
from fulora.data.manifest import Manifest
from fulora.evaluate.run import evaluate_predictions

CLASSES = ["abdomen", "brain", "femur", "other", "thorax"]


def _scipy_auc(target, score) -> float:
    target = np.asarray(target, dtype=bool)
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rankdata(score)[target].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _sklearn_auc(target, score) -> float:
    target = np.asarray(target, dtype=bool)
    if target.all() or not target.any():
        return float("nan")
    return float(roc_auc_score(target, np.asarray(score, dtype=float)))


@contextmanager
def _auc_by(function):
    """Both of ``metrics.py``'s AUCs computed by ``function`` (None: fulora's own)."""
    saved = metrics_module.binary_auc, metrics_module._binary_score_auc
    if function is not None:
        metrics_module.binary_auc = metrics_module._binary_score_auc = function
    try:
        yield
    finally:
        metrics_module.binary_auc, metrics_module._binary_score_auc = saved


def _cohort(seed: int = 0) -> tuple[Manifest, np.ndarray]:
    rng = np.random.default_rng(seed)
    present = ["abdomen", "brain", "femur", "thorax"]
    labels = rng.choice(present, 217)
    rows = [
        {"path": f"/cohort/{i}.png", "label": label, "patient": f"p{i // 2}", "domain": "x"}
        for i, label in enumerate(labels)
    ]
    return Manifest.from_records(rows), rng.dirichlet(np.ones(len(CLASSES)), len(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    manifest, proba = _cohort()
    print(f"{cpu_name()}, {platform.python_version()}; best of {args.repeats} (sklearn: 1 run)")
    seconds, intervals = {}, {}
    for name, auc in (("fulora", None), ("scipy rankdata", _scipy_auc), ("sklearn", _sklearn_auc)):
        best = float("inf")
        with _auc_by(auc):
            for _ in range(1 if name == "sklearn" else args.repeats):  # 50 s a run
                start = time.perf_counter()
                result = evaluate_predictions(manifest, proba, CLASSES)
                best = min(best, time.perf_counter() - start)
        seconds[name] = best
        intervals[name] = {s: v["ci95"] for s, v in result["spaces"].items()}
    for name, value in seconds.items():
        ratio = value / seconds["fulora"]
        print(f"{name:>15}: {value:6.2f} s per evaluation (1000 resamples), {ratio:.1f}x fulora's")
    for name in ("scipy rankdata", "sklearn"):
        mine, theirs = intervals["fulora"], intervals[name]
        largest = max(
            abs(a - b)
            for space in mine
            for key in mine[space]
            for a, b in zip(mine[space][key], theirs[space][key], strict=True)
        )
        print(
            f"intervals against {name}: identical {mine == theirs}, "
            f"largest difference {largest:.1e}"
        )


if __name__ == "__main__":
    main()
