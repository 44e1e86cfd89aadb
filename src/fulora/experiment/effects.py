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
    return drawn_mean(per_seed, draws, keys)


def drawn_mean(
    values: Sequence[dict[str, np.ndarray]], draws: np.ndarray, keys
) -> dict[str, np.ndarray]:
    """Each replicate's mean of ``values``, each member as often as the replicate drew it.

    ``values`` holds one dict of (R,) arrays per member; ``draws`` is (R, members).
    """
    n = draws.sum(axis=1)
    # A member drawn 0 times adds nothing, not 0 x NaN where its AUC is undefined.
    return {
        key: np.stack(
            [np.where(draws[:, k] > 0, draws[:, k] * m[key], 0.0) for k, m in enumerate(values)],
            axis=1,
        ).sum(axis=1)
        / n
        for key in keys
    }


def runs_mean(
    probas: Sequence[Sequence[np.ndarray]],
    run_draws: np.ndarray,
    seed_draws: Sequence[np.ndarray],
    y: np.ndarray,
    counts: np.ndarray,
    test_labels: list[int],
    space: str,
    keys=EFFECT_COLUMNS,
) -> dict[str, np.ndarray]:
    """Each replicate's mean over the LoRA runs it drew of their seed means (:func:`seed_mean`).

    ``probas`` holds each run's seeds' probabilities, ``run_draws`` is (R, runs) and
    ``seed_draws`` one (R, seeds) array per run.
    """
    per_run = [
        seed_mean(p, d, y, counts, test_labels, space, keys)
        for p, d in zip(probas, seed_draws, strict=True)
    ]
    return drawn_mean(per_run, run_draws, keys)


def patient_counts(first: Evaluation, n_resamples: int, seed: int) -> np.ndarray:
    """How often each test image is in each replicate, its patients drawn with replacement."""
    groups = [str(p) for p in first.predictions["patient"]]
    return resample_counts(len(groups), groups, n_resamples, seed)


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
    return pooled_difference_ci([evals], base, space, n_resamples, seed)


def pooled_difference_ci(
    runs: Sequence[Sequence[Evaluation]],
    base: Sequence[Evaluation],
    space: str,
    n_resamples: int,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """:func:`difference_ci` of a regime with several LoRA runs (variants differing by seed).

    The difference is the mean over the runs of their seed means, minus the baseline's. Each
    replicate draws the runs with replacement too, and each run's seeds (once per run:
    a run drawn twice counts its seeds' draw twice), so the interval holds how much another
    LoRA run and its images would differ. One run: :func:`difference_ci`, draws and all.

    Raises:
        DataError: The evaluations were not all made on the same images in the same order.
    """
    check_same_images([*(e for run in runs for e in run), *base])
    first = runs[0][0]
    y, test_labels = first.labels(), first.test_labels()
    ours = [[e.probabilities() for e in run] for run in runs]
    theirs = [e.probabilities() for e in base]

    def diff(counts, run_draws, seed_draws, their_draws) -> dict:
        a = runs_mean(ours, run_draws, seed_draws, y, counts, test_labels, space)
        b = seed_mean(theirs, their_draws, y, counts, test_labels, space)
        return {key: a[key] - b[key] for key in EFFECT_COLUMNS}

    def ones(n: int, rows: int = 1) -> np.ndarray:
        return np.ones((rows, n), int)

    every = diff(ones(len(y)), ones(len(runs)), [ones(len(p)) for p in ours], ones(len(theirs)))
    counts = patient_counts(first, n_resamples, seed)
    # The seeds' (and runs') draws come from a generator apart from the patients' draws.
    if len(runs) == 1:
        rng = np.random.default_rng([seed, 2])
        our_draws, their_draws = draw_seeds(rng, n_resamples, (len(ours[0]), len(theirs)))
        run_draws, seed_draws = ones(1, n_resamples), [our_draws]
    else:
        rng = np.random.default_rng([seed, 3])
        sizes = (len(runs), *(len(p) for p in ours), len(theirs))
        run_draws, *seed_draws, their_draws = draw_seeds(rng, n_resamples, sizes)
    resampled = diff(counts, run_draws, seed_draws, their_draws)
    return {k: float(v[0]) for k, v in every.items()}, percentile_intervals(resampled)


def check_same_images(evals: Sequence[Evaluation]) -> None:
    """Refuse evaluations that were not made on the same images in the same order."""
    first = evals[0]
    paths = list(first.predictions["path"])
    for other in evals[1:]:
        if list(other.predictions["path"]) != paths:
            raise DataError(
                f"{other.folder} and {first.folder} were not tested on the same images: "
                "seeds, LoRA runs and a regime's baseline are drawn together only on one test "
                "set (evaluate them again on the same manifest)"
            )


def group_cells(cells: Sequence) -> dict[tuple, list]:
    """The grid's evaluation cells by (target, regime, LoRA, arch): each group its seeds."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell.target, cell.regime, cell.lora, cell.arch), []).append(cell)
    return groups


def pooled_runs(groups: dict[tuple, list], replicates: Sequence[Sequence[str]]):
    """``(key, runs, label)`` of each group of LoRA replicates that a (target, regime, arch) has.

    ``key`` is the first variant's group key; ``runs`` holds each variant's cells, in the
    order of ``replicates``; ``label`` is the pooled row's LoRA name.
    """
    for variants in replicates:
        for target, regime, lora, arch in list(groups):
            runs = [groups.get((target, regime, v, arch)) for v in variants]
            if lora == variants[0] and all(runs):
                yield (target, regime, lora, arch), runs, "pooled: " + ", ".join(variants)


def effects(
    cells: Sequence,
    baselines: dict[str, str],
    n_bootstrap: int,
    seed: int = 0,
    read: Callable[[Path], Evaluation] = Evaluation.read,
    replicates: Sequence[Sequence[str]] = (),
) -> pd.DataFrame:
    """The effects table: one row per regime with a baseline, LoRA, arch, target and space.

    Args:
        cells: The grid's evaluations (:class:`~fulora.experiment.results.EvaluationCell`).
        baselines: Regime -> its baseline regime (:func:`regime_baselines`).
        n_bootstrap: Bootstrap replicates of the intervals.
        seed: Of those replicates.
        read: How an evaluation folder is read (the results stage's cached reader).
        replicates: Groups of LoRA variants that differ only by seed
            (:func:`~fulora.experiment.config.lora_replicates`): each adds a row per regime
            with all of them pooled (:func:`pooled_difference_ci`), against a baseline
            without synthetic images.
    """
    groups = group_cells(cells)
    rows: list[dict] = []

    def add(key: tuple, runs: list, base: list, label: str) -> None:
        target, regime, _, arch = key
        names = {"target": target, "Data": regime, "LoRA": label, "arch": arch}
        rows.extend(_effect_rows(runs, base, names, baselines[regime], n_bootstrap, seed, read))

    for (target, regime, lora, arch), group in groups.items():
        base_regime = baselines.get(regime)
        base = groups.get((target, base_regime, lora, arch)) or groups.get(
            (target, base_regime, None, arch)
        )
        if base:
            add((target, regime, lora, arch), [group], base, lora or "")
    for (target, regime, lora, arch), runs, label in pooled_runs(groups, replicates):
        base = groups.get((target, baselines.get(regime), None, arch))
        if base:
            add((target, regime, lora, arch), runs, base, label)
    return pd.DataFrame(rows)


def _effect_rows(runs, base, names: dict, base_regime: str, n_bootstrap, seed, read) -> list:
    """The rows (one per label space) of ``runs`` (LoRA runs' cells) against ``base``'s."""
    evals = [[read(c.folder) for c in run] for run in runs]
    base_evals = [read(c.folder) for c in base]
    rows = []
    for space in SPACES:
        diff, ci = pooled_difference_ci(evals, base_evals, space, n_bootstrap, seed)
        row = {
            "target": names["target"],
            "space": space,
            **{k: names[k] for k in ("Data", "LoRA", "arch")},
            "baseline": base_regime,
            "LoRA runs": len(evals),
            "seeds": sum(len(run) for run in evals),
            "baseline seeds": len(base_evals),
        }
        for key, name in EFFECT_COLUMNS.items():
            low, high = ci.get(key, (float("nan"), float("nan")))  # none: n_bootstrap 0
            row[f"{name} diff"] = round(diff[key], 2)
            row[f"{name} diff ci_low"] = round(low, 2)
            row[f"{name} diff ci_high"] = round(high, 2)
        rows.append(row)
    return rows


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
