"""The bootstrap: every replicate at once against one ``metrics`` call per replicate.

Three places bootstrap the test patients with 1000 replicates: each evaluation
(``evaluate_predictions``: every headline metric, both label spaces), each row of the results
table (``seed_mean_ci``: the seed mean, the seeds drawn too) and each row of the effects
table (``difference_ci``: a regime's seed mean minus its baseline's). Until session 23 each
replicate called ``metrics`` once per seed; now ``fulora.evaluate.bootstrap`` scores all
replicates as one count matrix. This times both on a cohort of the African set's shape (217
images, 4 of the model's 5 planes, 2 images per patient, random probabilities, 3 seeds per
regime), in this process, with the same draws, checks that the intervals are identical, and
projects the results stage of ``configs/fu-lora-sound.yaml``'s grid (80 results rows, 60
effects rows).

Usage: python benchmarks/bench_evaluate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from bench_cli import cpu_name  # benchmarks/ is the script's folder, first on sys.path

from fulora.data.manifest import Manifest
from fulora.evaluate.bootstrap import percentile_intervals, resample_counts
from fulora.evaluate.metrics import SPACES, metrics
from fulora.evaluate.result import Evaluation
from fulora.evaluate.run import HEADLINE, evaluate_predictions
from fulora.experiment.effects import EFFECT_COLUMNS, difference_ci, draw_seeds
from fulora.experiment.results import COLUMNS, seed_mean_ci

CLASSES = ["abdomen", "brain", "femur", "other", "thorax"]
PRESENT = ["abdomen", "brain", "femur", "thorax"]
N_IMAGES, N_RESAMPLES = 217, 1000
#: fu-lora-sound.yaml: (ES, ES+DA, HB x 3 LoRAs, HB+DA x 3) x 5 archs x 2 label spaces, and
#: the 6 hybrid regimes' rows against their baselines.
RESULTS_ROWS, EFFECTS_ROWS = 80, 60


def _cohort(seed: int = 0) -> tuple[Manifest, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(PRESENT, N_IMAGES)
    rows = [
        {"path": f"/cohort/{i}.png", "label": label, "patient": f"p{i // 2}", "domain": "x"}
        for i, label in enumerate(labels)
    ]
    probas = [rng.dirichlet(np.ones(len(CLASSES)), N_IMAGES) for _ in range(6)]
    return Manifest.from_records(rows), probas[0], probas


def _evaluations(manifest: Manifest, probas: list[np.ndarray]) -> list[Evaluation]:
    frame = manifest.frame[["path", "label", "patient", "domain"]]
    evals = []
    for k, proba in enumerate(probas):
        columns = {f"p_{c}": proba[:, i] for i, c in enumerate(CLASSES)}
        predictions = pd.concat([frame, pd.DataFrame(columns)], axis=1)
        evals.append(Evaluation(Path(f"e{k}"), CLASSES, PRESENT, N_IMAGES, {}, {}, predictions))
    return evals


def _replicate_loop(y, probas, draws, counts, space, keys) -> dict[str, np.ndarray]:
    """The seed mean of each replicate, one ``metrics`` call per replicate and drawn seed."""
    labels = sorted(set(y.tolist()))
    out = {key: np.empty(len(counts)) for key in keys}
    for r, row in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), row)
        values = {k: metrics(y[idx], probas[k][idx], labels, space) for k in draws[r].nonzero()[0]}
        for key in keys:
            out[key][r] = sum(draws[r, k] * v[key] for k, v in values.items()) / draws[r].sum()
    return out


def _loop_evaluation(y, proba, patients) -> dict:
    counts = resample_counts(len(y), patients, N_RESAMPLES, 0)
    ones = np.ones((N_RESAMPLES, 1), int)
    return {s: _replicate_loop(y, [proba], ones, counts, s, HEADLINE) for s in SPACES}


def _loop_seed_mean(y, probas, patients) -> dict:
    counts = resample_counts(len(y), patients, N_RESAMPLES, 0)
    (draws,) = draw_seeds(np.random.default_rng([0, 1]), N_RESAMPLES, (len(probas),))
    return _replicate_loop(y, probas, draws, counts, "all_outputs", COLUMNS)


def _loop_difference(y, ours, theirs, patients) -> dict:
    counts = resample_counts(len(y), patients, N_RESAMPLES, 0)
    rng = np.random.default_rng([0, 2])
    our_draws, their_draws = draw_seeds(rng, N_RESAMPLES, (len(ours), len(theirs)))
    a = _replicate_loop(y, ours, our_draws, counts, "all_outputs", EFFECT_COLUMNS)
    b = _replicate_loop(y, theirs, their_draws, counts, "all_outputs", EFFECT_COLUMNS)
    return {key: a[key] - b[key] for key in EFFECT_COLUMNS}


def _best(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    manifest, proba, probas = _cohort()
    evals = _evaluations(manifest, probas)
    y, patients = evals[0].labels(), list(manifest.frame["patient"])
    print(f"{cpu_name()}, {platform.python_version()}; best of {args.repeats}")
    cases = {
        "one evaluation (both spaces)": (
            lambda: {
                s: v["ci95"]
                for s, v in evaluate_predictions(manifest, proba, CLASSES)["spaces"].items()
            },
            lambda: {
                s: {k: list(v) for k, v in percentile_intervals(values).items()}
                for s, values in _loop_evaluation(y, proba, patients).items()
            },
        ),
        "a results row (3 seeds)": (
            lambda: seed_mean_ci(evals[:3], "all_outputs", N_RESAMPLES),
            lambda: percentile_intervals(_loop_seed_mean(y, probas[:3], patients)),
        ),
        "an effects row (3 + 3 seeds)": (
            lambda: difference_ci(evals[:3], evals[3:], "all_outputs", N_RESAMPLES)[1],
            lambda: percentile_intervals(_loop_difference(y, probas[:3], probas[3:], patients)),
        ),
    }
    seconds = {}
    for name, (at_once, loop) in cases.items():
        fast, fast_ci = _best(at_once, args.repeats)
        slow, slow_ci = _best(loop, 1)  # seconds a run; the loop is the slow side
        seconds[name] = (fast, slow)
        print(
            f"{name:>30}: at once {fast:6.3f} s, loop {slow:6.2f} s, {slow / fast:5.1f}x; "
            f"intervals identical: {fast_ci == slow_ci}"
        )
    grid = [RESULTS_ROWS * seconds["a results row (3 seeds)"][i] for i in (0, 1)]
    grid = [
        g + EFFECTS_ROWS * seconds["an effects row (3 + 3 seeds)"][i] for i, g in enumerate(grid)
    ]
    print(
        f"fu-lora-sound's results stage (projected): at once {grid[0]:.0f} s, loop {grid[1]:.0f} s"
    )


if __name__ == "__main__":
    main()
