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
from fulora.evaluate.metrics import SPACES, bootstrap, metrics
from fulora.evaluate.result import Evaluation

#: Metric key -> column name of the effects table (the paper's three headline metrics).
EFFECT_COLUMNS = {"accuracy": "ACC", "f1_macro": "F-score", "auc_macro": "AUC"}


def seed_mean(probas, draws, y, idx, test_labels, space, keys=EFFECT_COLUMNS) -> dict[str, float]:
    """The metrics ``keys`` on test items ``idx``, averaged over the seeds drawn.

    Args:
        probas: Each seed's class probabilities on the test set.
        draws: How often each seed was drawn (ones: every seed once).
        y: The test labels (class indices).
        idx: The test items to score (a bootstrap resample), indexing ``y`` and ``probas``.
        test_labels: The classes present in the test set.
        space: The label space (:data:`~fulora.evaluate.metrics.SPACES`).
        keys: The metric keys to average.
    """
    values = {k: metrics(y[idx], probas[k][idx], test_labels, space) for k in draws.nonzero()[0]}
    n = int(draws.sum())
    return {key: float(sum(draws[k] * v[key] for k, v in values.items()) / n) for key in keys}


def draw_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """How often each of ``n`` seeds is drawn in one bootstrap replicate (n draws, replaced)."""
    return np.bincount(rng.integers(0, n, n), minlength=n)


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

    def diff(idx: np.ndarray, our_draws: np.ndarray, their_draws: np.ndarray) -> dict:
        a = seed_mean(ours, our_draws, y, idx, test_labels, space)
        b = seed_mean(theirs, their_draws, y, idx, test_labels, space)
        return {key: float(a[key] - b[key]) for key in EFFECT_COLUMNS}

    seed_draws = np.random.default_rng([seed, 2])  # apart from the patients' draws
    every = diff(np.arange(len(y)), np.ones(len(ours), int), np.ones(len(theirs), int))
    groups = [str(p) for p in first.predictions["patient"]]
    resampled = bootstrap(
        lambda idx: diff(
            idx, draw_seeds(seed_draws, len(ours)), draw_seeds(seed_draws, len(theirs))
        ),
        len(y),
        groups,
        n_resamples,
        seed,
    )
    return every, resampled


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
