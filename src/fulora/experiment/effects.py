"""What a regime does against its baseline: the difference of seed means, with a 95% interval.

The paper's claim is a difference (HB+DA against real-only, +13.73 ACC). Each row here is one
regime (and LoRA variant) against its baseline regime (:func:`~fulora.experiment.config.
regime_baselines`) for one architecture, target cohort and label space. Both were tested on
the same images, so each bootstrap replicate resamples the test patients once for both (a
paired design: the images' difficulty cancels) and draws each regime's seeds apart, as
:func:`~fulora.experiment.results.seed_mean_ci` does for one regime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fulora.errors import DataError
from fulora.evaluate.bootstrap import percentile_intervals, replicate_metrics, resample_counts
from fulora.evaluate.metrics import SPACES
from fulora.evaluate.result import Evaluation

#: Metric key -> column name of the effects table (the paper's three headline metrics).
EFFECT_COLUMNS = {"accuracy": "ACC", "f1_macro": "F-score", "auc_macro": "AUC"}


def seed_mean(
    probas: Sequence[np.ndarray],
    draws: np.ndarray,
    y: np.ndarray,
    counts: np.ndarray,
    test_labels: list[int],
    space: str,
    keys=EFFECT_COLUMNS,
) -> dict[str, np.ndarray]:
    """The metrics ``keys`` of each bootstrap replicate, averaged over the seeds it drew.

    Args:
        probas: Each seed's class probabilities on the test set.
        draws: How often each seed is drawn in each replicate, shape (R, seeds)
            (:func:`draw_seeds`; a row of ones: every seed once).
        y: The test labels (class indices).
        counts: How often each test item is in each replicate, shape (R, items)
            (:func:`~fulora.evaluate.bootstrap.resample_counts`).
        test_labels: The classes present in the test set.
        space: The label space (:data:`~fulora.evaluate.metrics.SPACES`).
        keys: The metric keys to average.

    Returns:
        ``{key: values}``, each of shape (R,).
    """
    per_seed = [replicate_metrics(y, p, test_labels, space, counts, keys) for p in probas]
    n = draws.sum(axis=1)
    # A seed drawn 0 times adds nothing, not 0 x NaN where its AUC is undefined.
    return {
        key: np.stack(
            [np.where(draws[:, k] > 0, draws[:, k] * m[key], 0.0) for k, m in enumerate(per_seed)],
            axis=1,
        ).sum(axis=1)
        / n
        for key in keys
    }


def draw_seeds(
    rng: np.random.Generator, n_resamples: int, sizes: Sequence[int]
) -> list[np.ndarray]:
    """How often each seed is drawn in each replicate, one (n_resamples, n) array per size.

    Each replicate draws, for each of ``sizes`` in turn, n of n seeds with replacement.
    """
    draws = [np.empty((n_resamples, n), dtype=np.int64) for n in sizes]
    for r in range(n_resamples):
        for drawn, n in zip(draws, sizes, strict=True):
            drawn[r] = np.bincount(rng.integers(0, n, n), minlength=n)
    return draws


def difference_ci(
    evals: Sequence[Evaluation],
    base: Sequence[Evaluation],
    space: str,
    n_resamples: int,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(mean difference, its 95% interval) of each metric: ``evals``' seeds minus ``base``'s.

    Raises:
        DataError: The two were not tested on the same images in the same order.
    """
    first = evals[0]
    paths = list(first.predictions["path"])
    for other in (*evals[1:], *base):
        if list(other.predictions["path"]) != paths:
            raise DataError(
                f"{other.folder} and {first.folder} were not tested on the same images: "
                "a regime is compared with its baseline only on one test set"
            )
    y, test_labels = first.labels(), first.test_labels()
    ours, theirs = [e.probabilities() for e in evals], [e.probabilities() for e in base]

    def diff(counts: np.ndarray, our_draws: np.ndarray, their_draws: np.ndarray) -> dict:
        a = seed_mean(ours, our_draws, y, counts, test_labels, space)
        b = seed_mean(theirs, their_draws, y, counts, test_labels, space)
        return {key: a[key] - b[key] for key in EFFECT_COLUMNS}

    every = diff(*(np.ones((1, n), int) for n in (len(y), len(ours), len(theirs))))
    groups = [str(p) for p in first.predictions["patient"]]
    counts = resample_counts(len(y), groups, n_resamples, seed)
    # The seeds' draws come from a generator apart from the patients' draws.
    seed_rng = np.random.default_rng([seed, 2])
    resampled = diff(counts, *draw_seeds(seed_rng, n_resamples, (len(ours), len(theirs))))
    return {k: float(v[0]) for k, v in every.items()}, percentile_intervals(resampled)


def effects(
    cells: Sequence,
    baselines: dict[str, str],
    n_bootstrap: int,
    seed: int = 0,
    read: Callable[[Path], Evaluation] = Evaluation.read,
) -> pd.DataFrame:
    """The effects table: one row per regime with a baseline, LoRA, arch, target and space.

    Args:
        cells: The grid's evaluations (:class:`~fulora.experiment.results.EvaluationCell`).
        baselines: Regime -> its baseline regime (:func:`regime_baselines`).
        n_bootstrap: Bootstrap replicates of the intervals.
        seed: Of those replicates.
        read: How an evaluation folder is read (the results stage's cached reader).
    """
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell.target, cell.regime, cell.lora, cell.arch), []).append(cell)
    rows = []
    for (target, regime, lora, arch), group in groups.items():
        base_regime = baselines.get(regime)
        base = groups.get((target, base_regime, lora, arch)) or groups.get(
            (target, base_regime, None, arch)
        )
        if not base:
            continue
        evals, base_evals = [read(c.folder) for c in group], [read(c.folder) for c in base]
        for space in SPACES:
            diff, ci = difference_ci(evals, base_evals, space, n_bootstrap, seed)
            row = {
                "target": target,
                "space": space,
                "Data": regime,
                "LoRA": lora or "",
                "arch": arch,
                "baseline": base_regime,
                "seeds": len(evals),
                "baseline seeds": len(base_evals),
            }
            for key, name in EFFECT_COLUMNS.items():
                low, high = ci.get(key, (float("nan"), float("nan")))  # none: n_bootstrap 0
                row[f"{name} diff"] = round(diff[key], 2)
                row[f"{name} diff ci_low"] = round(low, 2)
                row[f"{name} diff ci_high"] = round(high, 2)
            rows.append(row)
    return pd.DataFrame(rows)


def display_effects(table: pd.DataFrame, space: str, target: str) -> pd.DataFrame:
    """The effects of one target and label space as ``+d.d [low, high]`` cells."""
    part = table[(table["space"] == space) & (table["target"] == target)]
    out = part[["Data", "LoRA", "Model", "baseline"]].copy()
    if not (out["LoRA"] != "").any():
        out = out.drop(columns="LoRA")
    for name in EFFECT_COLUMNS.values():
        out[name] = [_effect_cell(row, name) for _, row in part.iterrows()]
    return out


def _effect_cell(row, name: str) -> str:
    text = f"{row[f'{name} diff']:+.2f}"
    low, high = row[f"{name} diff ci_low"], row[f"{name} diff ci_high"]
    return text if pd.isna(low) else f"{text} [{low:+.1f}, {high:+.1f}]"
