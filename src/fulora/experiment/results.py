"""The experiment's results table: the paper's columns, mean ± std over seeds, 95% CIs.

For every (target cohort, label space, regime, LoRA variant, architecture) the table gives the
number of real and synthetic training images and ACC, Recall, Precision, F-score and AUC as the
mean ± standard deviation over seeds, with a 95% bootstrap interval of the seed-averaged
metric that resamples the seeds and the test patients (every drawn seed's predictions on the
same resampled patients), so it holds the training's variation as well as the test set's. With
``compare: paper`` it also lines our numbers up against the FU-LoRA paper's table
(``paper_results.csv``, Wang et al. 2024, Table 2: zero-shot on the African test split).

LoRA variants that differ only by ``seed`` (one recipe trained several times) add a pooled row
per regime and architecture: the mean over the LoRA runs of their seed means, the standard
deviation over all their seeds, and an interval that draws the runs too, so that it holds how
much another LoRA run and its images would differ (as the effects table's pooled rows do).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fulora.classify.registry import resolve_arch
from fulora.errors import ConfigError, DataError
from fulora.evaluate.bootstrap import percentile_intervals
from fulora.evaluate.metrics import SPACES
from fulora.evaluate.result import Evaluation
from fulora.experiment.config import (
    ExperimentConfig,
    classifier_protocol,
    lora_replicates,
    regime_baselines,
)
from fulora.experiment.effects import (
    check_same_images,
    display_effects,
    draw_seeds,
    effects,
    group_cells,
    patient_counts,
    pooled_runs,
    runs_mean,
    seed_mean,
)
from fulora.experiment.layout import ExperimentLayout
from fulora.io import atomic_open, write_text
from fulora.runs import RunDir

#: Our metric keys and the paper's column names, in the paper's order.
COLUMNS = {
    "accuracy": "ACC",
    "recall_macro": "Recall",
    "precision_macro": "Precision",
    "f1_macro": "F-score",
    "auc_macro": "AUC",
    "paper_auc": "AUC (paper)",
}

#: The paper's names of its five backbones.
PAPER_NAMES = {
    "densenet169": "DenseNet169",
    "mobilenet_v2": "MobileNet v2",
    "efficientnet_b0": "EfficientNet b0",
    "resnet18": "ResNet18",
    "vit_b_16": "ViT b16",
}

PAPER_TABLE = Path(__file__).with_name("paper_results.csv")


def model_name(arch: str) -> str:
    """The paper's display name of an architecture (its own name otherwise)."""
    return PAPER_NAMES.get(resolve_arch(arch), arch)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-style Markdown table of a data frame (no extra dependency)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = (
        "|"
        + "|".join(
            "---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns
        )
        + "|"
    )
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


@dataclass(frozen=True)
class EvaluationCell:
    """One evaluation of the grid: which classifier, on which cohort, and where its files are."""

    target: str  # the test cohort's name
    regime: str
    lora: str | None  # the LoRA variant of a hybrid regime
    arch: str
    seed: int
    classifier: Path  # the classifier's run folder
    folder: Path  # the evaluation's run folder


def _training_counts(classifier: Path) -> tuple[int, int]:
    """(real, synthetic) training images of a finished classifier, from its ``done.json``."""
    done = RunDir(classifier).read_done()
    if done is None or "train_images" not in done:
        raise DataError(f"{classifier} is not a finished classifier run (no done.json)")
    synthetic = int(done.get("train_synthetic", 0))
    return int(done["train_images"]) - synthetic, synthetic


def seed_mean_ci(
    evals: list[Evaluation], space: str, n_resamples: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the seed-averaged metrics, resampling the seeds and the patients.

    Each replicate draws the test patients (the same for every seed) and, apart from them,
    the seeds, both with replacement. Patients alone gave intervals as if the seeds agreed:
    three demo seeds 47.0 ± 16.5 ACC got [43.0, 51.0], narrower than the seeds' own spread,
    and two regimes looked apart when their seeds overlapped. Seeds that agree give the
    patients' interval (the draw of seeds changes nothing).
    """
    first = evals[0]
    y, test_labels = first.labels(), first.test_labels()
    probas = [e.probabilities() for e in evals]
    counts = patient_counts(first, n_resamples, seed)
    seed_rng = np.random.default_rng([seed, 1])  # apart from the patients' draws
    (draws,) = draw_seeds(seed_rng, n_resamples, (len(probas),))
    return percentile_intervals(seed_mean(probas, draws, y, counts, test_labels, space, COLUMNS))


def pooled_mean_ci(
    runs: list[list[Evaluation]], space: str, n_resamples: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the mean over LoRA runs of their seed means, drawing the runs too.

    Each replicate draws the test patients (the same for every run and seed), the runs with
    replacement, and each run's seeds apart, as
    :func:`~fulora.experiment.effects.pooled_difference_ci` does for a difference.

    Args:
        runs: Each LoRA run's evaluations, one per classifier seed.
        space: The label space (:data:`~fulora.evaluate.metrics.SPACES`).
        n_resamples: Bootstrap replicates (0: no interval, an empty dict).
        seed: Of the replicates.

    Returns:
        ``{metric: (low, high)}`` for each of :data:`COLUMNS`.

    Raises:
        DataError: The runs were not all tested on the same images in the same order.
    """
    check_same_images([e for run in runs for e in run])
    first = runs[0][0]
    y, test_labels = first.labels(), first.test_labels()
    probas = [[e.probabilities() for e in run] for run in runs]
    counts = patient_counts(first, n_resamples, seed)
    rng = np.random.default_rng([seed, 3])  # apart from the patients' draws
    sizes = (len(runs), *(len(p) for p in probas))
    run_draws, *seed_draws = draw_seeds(rng, n_resamples, sizes)
    drawn = runs_mean(probas, run_draws, seed_draws, y, counts, test_labels, space, COLUMNS)
    return percentile_intervals(drawn)


def collect(
    cells: list[EvaluationCell],
    n_bootstrap: int,
    seed: int = 0,
    read: Callable[[Path], Evaluation] = Evaluation.read,
    replicates: list[list[str]] | tuple = (),
) -> pd.DataFrame:
    """The tidy results table (one row per target, space, regime, LoRA, arch).

    Args:
        cells: The grid's evaluations; those that differ only by seed form one row.
        n_bootstrap: Resamples of the seed-averaged intervals (a single seed keeps its own).
        seed: Of those resamples.
        read: How an evaluation folder is read (a cached reader when several tables are made).
        replicates: Groups of LoRA variants that differ only by seed
            (:func:`~fulora.experiment.config.lora_replicates`): each adds a pooled row per
            target, regime and architecture that has all of them.
    """
    groups = group_cells(cells)
    rows = []
    for key, group in groups.items():
        rows += _rows(key, [group], key[2] or "", n_bootstrap, seed, read)
    for key, runs, label in pooled_runs(groups, replicates):
        rows += _rows(key, runs, label, n_bootstrap, seed, read)
    return pd.DataFrame(rows)


def _rows(key: tuple, runs: list, label: str, n_bootstrap: int, seed: int, read) -> list[dict]:
    """The rows (one per label space) of one regime's LoRA runs, each a list of seeds' cells."""
    target, regime, _, arch = key
    evals = [[read(c.folder) for c in run] for run in runs]
    counts = np.array([_training_counts(run[0].classifier) for run in runs])
    real, synthetic = (int(round(v)) for v in counts.mean(axis=0))  # pooled: the runs' mean
    rows = []
    for space in SPACES:
        row: dict[str, Any] = {
            "target": target,
            "space": space,
            "Data": regime,
            "LoRA": label,
            "Model": model_name(arch),
            "arch": resolve_arch(arch),
            "# real": real,
            "# synthetic": synthetic,
            "# test": evals[0][0].images,
            "seeds": sum(len(run) for run in evals),
        }
        ci = _interval(evals, space, n_bootstrap, seed)
        for metric, name in COLUMNS.items():
            per_run = [[e.spaces[space].metrics[metric] for e in run] for run in evals]
            values = np.array([v for run in per_run for v in run], dtype=float)
            row[name] = round(float(np.mean([np.mean(run) for run in per_run])), 2)
            row[f"{name} std"] = round(float(values.std(ddof=1)), 2) if len(values) > 1 else 0.0
            low, high = ci.get(metric, (float("nan"), float("nan")))
            row[f"{name} ci_low"] = round(float(low), 2)
            row[f"{name} ci_high"] = round(float(high), 2)
        rows.append(row)
    return rows


def _interval(evals: list[list[Evaluation]], space: str, n_bootstrap: int, seed: int) -> dict:
    """The 95% intervals of a row: one seed's own, the seeds', or the pooled runs'."""
    if len(evals) > 1:
        return pooled_mean_ci(evals, space, n_bootstrap, seed)
    if len(evals[0]) > 1:
        return seed_mean_ci(evals[0], space, n_bootstrap, seed)
    return evals[0][0].spaces[space].ci95


def per_domain(
    cells: list[EvaluationCell], read: Callable[[Path], Evaluation] = Evaluation.read
) -> pd.DataFrame:
    """Per-domain (e.g. per-country) metrics, averaged over seeds (``read``: as in ``collect``)."""
    rows = []
    for cell in cells:
        for domain, scores in read(cell.folder).per_domain.items():
            for space in SPACES:
                rows.append(
                    {
                        "target": cell.target,
                        "space": space,
                        "Data": cell.regime,
                        "LoRA": cell.lora or "",
                        "Model": model_name(cell.arch),
                        "domain": domain,
                        "images": scores.images,
                        **{COLUMNS[k]: scores.spaces[space][k] for k in COLUMNS},
                    }
                )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    keys = ["target", "space", "Data", "LoRA", "Model", "domain", "images"]
    return frame.groupby(keys, sort=False, as_index=False)[list(COLUMNS.values())].mean().round(2)


def display_table(table: pd.DataFrame, space: str, target: str | None = None) -> pd.DataFrame:
    """The paper-style table of one label space: ``mean ± std [low, high]`` cells."""
    part = table[table["space"] == space]
    if target is not None:
        part = part[part["target"] == target]
    out = part[["Data", "LoRA", "Model", "# real", "# synthetic"]].copy()
    if not (out["LoRA"] != "").any():
        out = out.drop(columns="LoRA")
    for name in COLUMNS.values():
        cells = []
        for _, row in part.iterrows():
            text = f"{row[name]:.2f}"
            if row["seeds"] > 1:
                text += f" ± {row[f'{name} std']:.2f}"
            if not np.isnan(row[f"{name} ci_low"]):
                text += f" [{row[f'{name} ci_low']:.1f}, {row[f'{name} ci_high']:.1f}]"
            cells.append(text)
        out[name] = cells
    return out.reset_index(drop=True)


def compare_with(table: pd.DataFrame, reference: str | Path) -> pd.DataFrame:
    """Our all-outputs numbers next to a reference table in the paper's format."""
    ref = pd.read_csv(reference, encoding="utf-8-sig")
    ref["arch"] = [resolve_arch(m) for m in ref["Model"]]
    ours = table[table["space"] == "all_outputs"]
    rows = []
    for _, r in ref.iterrows():
        match = ours[(ours["Data"] == r["Data"]) & (ours["arch"] == r["arch"])]
        for _, o in match.iterrows() if len(match) else [(None, None)]:
            row = {"Data": r["Data"], "Model": r["Model"], "LoRA": "" if o is None else o["LoRA"]}
            for ours_key, ref_key in (
                ("ACC", "ACC"),
                ("Recall", "Recall"),
                ("Precision", "Precision"),
                ("F-score", "F-score"),
                ("AUC (paper)", "AUC"),
            ):
                row[f"{ref_key} paper"] = float(r[ref_key])
                row[f"{ref_key} ours"] = np.nan if o is None else float(o[ours_key])
                row[f"{ref_key} diff"] = (
                    np.nan if o is None else round(float(o[ours_key]) - float(r[ref_key]), 2)
                )
            rows.append(row)
    return pd.DataFrame(rows)


def write_results(
    out: str | Path, cfg: ExperimentConfig, cells: list[EvaluationCell]
) -> pd.DataFrame:
    """Write ``results/`` (CSV and Markdown tables, per-domain table, comparison); return it.

    Args:
        out: The experiment folder.
        cfg: The experiment's resolved config (name, protocol, bootstrap, comparison).
        cells: The grid's evaluations, all finished.
    """
    layout = ExperimentLayout(out)
    folder = layout.results
    folder.mkdir(parents=True, exist_ok=True)
    read = functools.cache(Evaluation.read)  # each evaluation once for both tables
    replicates = lora_replicates(cfg) if any(cell.lora for cell in cells) else []
    table = collect(cells, cfg.evaluate.n_bootstrap, cfg.evaluate.seed, read, replicates)
    with atomic_open(folder / "results.csv", "w", newline="") as handle:
        table.to_csv(handle, index=False)
    domains = per_domain(cells, read)
    with atomic_open(folder / "per_domain.csv", "w", newline="") as handle:
        domains.to_csv(handle, index=False)

    protocol = classifier_protocol(cfg)
    write_text(layout.protocol, protocol + "\n")
    lines = [f"# {cfg.name}: zero-shot results\n\nClassifier protocol: {protocol}.\n"]
    targets = list(dict.fromkeys(c.target for c in cells))
    for target in targets:
        for space in SPACES:
            lines.append(
                f"\n## {target}, {space.replace('_', ' ')} "
                f"({int(table[table['target'] == target]['# test'].iloc[0])} test images)\n\n"
                "Mean ± std over seeds [95% bootstrap interval of the mean, resampling seeds and "
                "patients]." + (_POOLED_NOTE if replicates else "") + "\n\n"
            )
            lines.append(markdown_table(display_table(table, space, target)))
    lines.extend(_write_effects(folder, cfg, cells, read, replicates))
    reference = reference_table(cfg.compare)
    if reference is not None:
        comparison = compare_with(table[table["target"] == targets[0]], reference)
        with atomic_open(folder / "comparison.csv", "w", newline="") as handle:
            comparison.to_csv(handle, index=False)
        lines.append(
            f"\n## Against {Path(reference).name} (all outputs; ours - paper)\n\n"
            f"Ours: {protocol}. The paper's AUC is compared with our AUC (paper): its "
            "notebook's formula, which counts a prediction of a plane absent from the test set "
            "as a positive for every plane.\n\n"
        )
        lines.append(markdown_table(comparison.round(2)))
    with atomic_open(folder / "results.md", "w") as handle:
        handle.write("".join(lines))
    return table


_POOLED_NOTE = (
    " A pooled row: LoRA variants that differ only by `seed`, the mean of their seed means, the "
    "std over all their seeds, and an interval that draws the LoRA runs too; its image counts "
    "are the runs' mean (an audit keeps another number of each run's images)."
)


def _write_effects(folder: Path, cfg: ExperimentConfig, cells, read, replicates) -> list[str]:
    """``effects.csv`` (each regime against its baseline) and its Markdown sections."""
    table = effects(
        cells, regime_baselines(cfg), cfg.evaluate.n_bootstrap, cfg.evaluate.seed, read, replicates
    )
    path = folder / "effects.csv"
    if table.empty:
        path.unlink(missing_ok=True)  # an earlier config's, with baselines this one lacks
        return []
    table.insert(table.columns.get_loc("arch"), "Model", [model_name(a) for a in table["arch"]])
    with atomic_open(path, "w", newline="") as handle:
        table.to_csv(handle, index=False)
    lines = []
    for target in dict.fromkeys(table["target"]):
        for space in SPACES:
            lines.append(
                f"\n## {target}, {space.replace('_', ' ')}: against the baseline\n\n"
                "Difference of seed means, regime minus baseline (ACC, F-score, AUC points), "
                "[95% bootstrap interval: the same patients for both, each regime's seeds "
                "drawn apart]. The interval leaves out how much another LoRA run and its "
                "images would differ (one run of each), except in a pooled row: LoRA variants "
                "that differ only by `seed`, their mean, with the runs drawn too.\n\n"
            )
            lines.append(markdown_table(display_effects(table, space, target)))
    return lines


def reference_table(compare: str | None) -> Path | None:
    """The table named by the config's ``compare`` (``paper`` or a CSV path), or None."""
    if not compare:
        return None
    if compare == "paper":
        return PAPER_TABLE
    path = Path(compare)
    if not path.is_file():
        raise ConfigError(f"'compare': {path} does not exist (use 'paper' or a CSV path)")
    return path
