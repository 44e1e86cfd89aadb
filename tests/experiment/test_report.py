"""The HTML report (self-contained, offline), its Chromium rendering, and the results helpers."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fulora.cli import main
from fulora.evaluate.metrics import bootstrap, metrics
from fulora.evaluate.result import Evaluation
from fulora.experiment.results import (
    PAPER_TABLE,
    compare_with,
    display_table,
    seed_mean_ci,
)

DOCS = Path(__file__).parents[2] / "docs"


def test_report_is_self_contained_and_complete(finished_experiment, capsys):
    assert main(["report", str(finished_experiment)]) == 0
    path = finished_experiment / "report" / "report.html"
    assert str(path) in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"https?://", text)  # nothing fetched from a network
    for heading in (
        "What was run",
        "Real and synthetic images",
        "Zero-shot results",
        "Confusion matrices",
        "Embeddings",
        "Tiny random model",
        "Per domain",
    ):
        assert heading in text, heading
    pngs = {p.name for p in (finished_experiment / "report").glob("*.png")}
    assert {"grid_r4.png", "bars_target.png", "embedding_tsne.png"} <= pngs
    assert len(sources) == len(pngs)  # every PNG shown is also written beside the page


def test_report_refuses_a_folder_that_is_not_an_experiment(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(finished_experiment, tmp_path):
    sys.path.insert(0, str(DOCS))
    try:
        from screenshot_report import screenshot
    finally:
        sys.path.pop(0)
    png = screenshot(finished_experiment / "report" / "report.html", tmp_path / "shot.png")
    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape == (2400, 1280)
    assert image.std() > 20  # rendered content, not a blank page
    assert (image[:60] < 100).mean() > 0.5  # the dark header bar is at the top


def test_seed_mean_interval_of_identical_seeds_is_the_single_seed_interval():
    rng = np.random.default_rng(0)
    classes = ["other", "abdomen", "brain"]
    n = 60
    labels = rng.choice(["abdomen", "brain"], n)
    proba = rng.dirichlet(np.ones(3), n)
    frame = pd.DataFrame({"label": labels, "patient": [f"p{i // 3}" for i in range(n)]})
    for i, c in enumerate(classes):
        frame[f"p_{c}"] = proba[:, i]
    frame["label"] = labels
    evaluation = Evaluation(
        folder=Path("unused"),
        classes=classes,
        test_classes=["abdomen", "brain"],
        images=n,
        spaces={},
        per_domain={},
        predictions=frame,
    )
    both = seed_mean_ci([evaluation, evaluation], "all_outputs", 50, seed=1)
    y = np.array([classes.index(v) for v in labels])
    single = bootstrap(
        lambda idx: metrics(y[idx], proba[idx], [1, 2], "all_outputs"),
        n,
        groups=list(frame["patient"]),
        n_resamples=50,
        seed=1,
    )
    for key in ("accuracy", "f1_macro", "auc_macro"):
        assert both[key] == pytest.approx(single[key])

    # Seeds that disagree: one right on every image, one wrong on every image. The seed mean is
    # 50% ACC; resampling patients alone would give [50, 50], as if the seeds agreed. Drawing
    # the seeds too, the interval reaches from all-wrong to all-right draws.
    right = np.eye(3)[y]
    wrong = np.eye(3)[np.where(y == 1, 2, 1)]
    apart = [
        Evaluation(**{**evaluation.__dict__, "predictions": _with_probabilities(frame, p, classes)})
        for p in (right, wrong)
    ]
    low, high = seed_mean_ci(apart, "all_outputs", 200, seed=1)["accuracy"]
    assert low == pytest.approx(0.0) and high == pytest.approx(100.0)


def _two_planes_test_set(n: int = 30):
    """A model's classes, and n test images of two planes, one patient each: (classes, y, frame)."""
    classes = ["other", "abdomen", "brain"]
    labels = np.array(["abdomen", "brain"] * (n // 2))
    y = np.array([classes.index(v) for v in labels])
    frame = pd.DataFrame(
        {"path": [f"img{i}.png" for i in range(n)], "label": labels, "patient": range(n)}
    )
    return classes, y, frame


def test_a_regime_against_its_baseline_is_a_paired_difference():
    """The difference of seed means, with an interval from the same patients for both."""
    from fulora.errors import DataError
    from fulora.experiment.effects import difference_ci, pooled_difference_ci

    classes, y, frame = _two_planes_test_set()
    n = len(y)

    def evaluation(proba, paths=None):
        predictions = _with_probabilities(frame, proba, classes)
        if paths is not None:
            predictions["path"] = paths
        return Evaluation(Path("unused"), classes, ["abdomen", "brain"], n, {}, {}, predictions)

    right, wrong = evaluation(np.eye(3)[y]), evaluation(np.eye(3)[np.where(y == 1, 2, 1)])
    same, same_ci = difference_ci([wrong, right], [wrong, right], "all_outputs", 100)
    assert same["accuracy"] == 0.0
    assert same_ci["accuracy"][0] < 0 < same_ci["accuracy"][1]  # the seeds are drawn apart
    gain, gain_ci = difference_ci([right], [wrong], "all_outputs", 100)
    assert gain["accuracy"] == 100.0 and gain_ci["accuracy"] == (100.0, 100.0)
    elsewhere = evaluation(np.eye(3)[y], paths=[f"other{i}.png" for i in range(n)])
    with pytest.raises(DataError, match="not tested on the same images"):
        difference_ci([right], [elsewhere], "all_outputs", 10)

    # LoRA runs pooled (variants that differ only by seed): the mean over runs of their seed
    # means, and an interval that draws the runs too. Two runs whose seeds agree within each
    # run, one right and one wrong everywhere: each run alone claims a certain +100 or 0,
    # pooled the difference is +50 and the interval spans both runs.
    pooled, pooled_ci = pooled_difference_ci([[right, right], [wrong]], [wrong], "all_outputs", 200)
    assert pooled["accuracy"] == 50.0
    assert pooled_ci["accuracy"] == (0.0, 100.0)


def test_lora_runs_that_differ_only_by_seed_are_pooled_in_the_results_table(tmp_path):
    """A pooled row: the mean of the runs' seed means, the std over all their seeds, and an
    interval that draws the runs too; each run's own row stays as it was."""
    from fulora.evaluate.metrics import SPACES
    from fulora.evaluate.result import SpaceScores
    from fulora.experiment.results import COLUMNS, EvaluationCell, collect, pooled_mean_ci

    classes, y, frame = _two_planes_test_set()
    n = len(y)

    def evaluation(proba, accuracy):
        scores = SpaceScores(
            metrics=dict.fromkeys(COLUMNS, accuracy), ci95={}, resamples=0, unit=""
        )
        predictions = _with_probabilities(frame, proba, classes)
        spaces = dict.fromkeys(SPACES, scores)
        return Evaluation(Path("unused"), classes, ["abdomen", "brain"], n, spaces, {}, predictions)

    right = evaluation(np.eye(3)[y], 100.0)
    wrong = evaluation(np.eye(3)[np.where(y == 1, 2, 1)], 0.0)
    # one run right with both seeds, one wrong with its one seed: each alone is certain
    low, high = pooled_mean_ci([[right, right], [wrong]], "all_outputs", 200)["accuracy"]
    assert (low, high) == (0.0, 100.0)

    runs = {"r4": [right, right], "r4-seed1": [wrong]}
    read, cells = {}, []
    for lora, evals in runs.items():
        classifier = tmp_path / lora
        classifier.mkdir()
        (classifier / "done.json").write_text('{"train_images": 120, "train_synthetic": 100}')
        for seed, e in enumerate(evals):
            folder = tmp_path / f"{lora}-eval-{seed}"
            read[folder] = e
            cells.append(EvaluationCell("t", "hybrid", lora, "resnet18", seed, classifier, folder))
    table = collect(cells, 200, read=read.__getitem__, replicates=[["r4", "r4-seed1"]])
    table = table[table["space"] == "all_outputs"].set_index("LoRA")
    assert list(table.index) == ["r4", "r4-seed1", "pooled: r4, r4-seed1"]
    pooled = table.loc["pooled: r4, r4-seed1"]
    assert pooled["ACC"] == 50.0  # the runs' mean, not the seeds' (66.67)
    assert pooled["ACC std"] == pytest.approx(57.74, abs=0.01)  # over the three seeds
    assert (pooled["ACC ci_low"], pooled["ACC ci_high"]) == (0.0, 100.0)
    assert (pooled["seeds"], pooled["# real"], pooled["# synthetic"]) == (3, 20, 100)
    assert table.loc["r4", "ACC"] == 100.0 and table.loc["r4", "seeds"] == 2


def _with_probabilities(frame: pd.DataFrame, proba: np.ndarray, classes) -> pd.DataFrame:
    out = frame.copy()
    for i, c in enumerate(classes):
        out[f"p_{c}"] = proba[:, i]
    return out


def test_comparison_with_the_paper_table_matches_cells_by_regime_and_model():
    paper = pd.read_csv(PAPER_TABLE, encoding="utf-8-sig")
    assert len(paper) == 20
    ours = pd.DataFrame(
        [
            {
                "space": "all_outputs",
                "Data": "HB+DA",
                "arch": "resnet18",
                "LoRA": "r128",
                "ACC": 80.0,
                "Recall": 80.0,
                "Precision": 90.0,
                "F-score": 84.0,
                "AUC (paper)": 88.0,
            }
        ]
    )
    table = compare_with(ours, PAPER_TABLE)
    assert len(table) == 20
    row = table[(table["Data"] == "HB+DA") & (table["Model"] == "ResNet18")].iloc[0]
    assert row["ACC paper"] == 82.4 and row["ACC ours"] == 80.0 and row["ACC diff"] == -2.4
    assert row["AUC paper"] == 89.29 and row["AUC diff"] == pytest.approx(-1.29)
    assert table["ACC ours"].isna().sum() == 19  # cells we did not run stay empty


def test_display_table_formats_mean_std_and_interval():
    row = {"target": "t", "space": "all_outputs", "Data": "ES", "LoRA": "", "Model": "ResNet18"}
    row |= {"# real": 10, "# synthetic": 0, "seeds": 3}
    for name in ("ACC", "Recall", "Precision", "F-score", "AUC", "AUC (paper)"):
        row |= {name: 61.234, f"{name} std": 2.5, f"{name} ci_low": 55.04, f"{name} ci_high": 66.0}
    shown = display_table(pd.DataFrame([row]), "all_outputs")
    assert "LoRA" not in shown.columns  # no synthetic regime: no LoRA column
    assert shown.loc[0, "ACC"] == "61.23 ± 2.50 [55.0, 66.0]"
