"""``fulora evaluate``: a trained classifier on a test manifest, zero-shot.

Writes into the output folder:

* ``predictions.csv``: path, true plane, prediction under both label spaces, confidence, every
  class probability, domain and patient;
* ``metrics.json``: headline metrics under both label spaces with bootstrap 95% intervals
  (resampling patients when the manifest has patient ids), per-domain and per-class tables,
  calibration (ECE and reliability bins), and what was evaluated;
* ``metrics.csv``: the same headline numbers as a tidy table (space, scope, metric columns);
* ``per_class.csv``, ``confusion_matrix.png`` (both spaces), ``reliability.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fulora.classify.features import run_classifier
from fulora.classify.train import load_classifier
from fulora.data.manifest import Manifest, describe_seen, images_seen
from fulora.errors import DataError
from fulora.evaluate.bootstrap import percentile_intervals, replicate_metrics, resample_counts
from fulora.evaluate.config import EvaluateConfig
from fulora.evaluate.metrics import (
    SPACES,
    confusion,
    expected_calibration_error,
    metrics,
    per_class_table,
    predict,
    restrict,
)
from fulora.evaluate.result import METRICS_NAME, PREDICTIONS_NAME
from fulora.figures import confusion_matrix_figure, reliability_diagram
from fulora.io import atomic_open, write_json
from fulora.runs import TRAIN_MANIFEST_NAME, RunDir

logger = logging.getLogger("fulora")

HEADLINE = ("accuracy", "recall_macro", "precision_macro", "f1_macro", "auc_macro", "paper_auc")


def predict_proba(
    model: torch.nn.Module,
    meta: dict[str, Any],
    manifest: Manifest,
    *,
    batch_size: int = 64,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Class probabilities (N, C) of a loaded classifier on a manifest."""
    proba, _ = run_classifier(
        model,
        meta,
        manifest,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        progress=progress,
    )
    return proba


def check_test_labels(manifest: Manifest, classes: list[str]) -> None:
    """Raise naming the first row whose label the model does not know."""
    known = set(classes)
    for row, label in enumerate(manifest.labels):
        if label not in known:
            raise DataError(
                f"test label {label!r} (row {row}, {manifest.paths[row]}) is not a class the model "
                f"knows ({', '.join(classes)}); drop those rows, e.g. "
                f"`fulora data manifest ... --labels {' '.join(classes)}`"
            )


def check_unseen(test: Manifest, seen: Iterable[str], what: str) -> None:
    """A zero-shot test holds no image the model trained on: by path, then by content.

    See :func:`~fulora.data.manifest.images_seen`; the audit's near-copy search finds copies
    that were re-encoded or resized.

    Raises:
        DataError: Naming how many test images are in ``what`` and the first one.
    """
    found = images_seen(test, seen)
    if found[1]:
        raise DataError(
            f"{describe_seen(test, found, 'test images', what)}: a zero-shot test must not see "
            "them; test on images that were not trained on"
        )


def _check_unseen_by(model_dir: Path, test: Manifest) -> None:
    """Against the run's ``train_manifest.csv`` (a ``.pt`` file alone has none to compare)."""
    trained = model_dir / TRAIN_MANIFEST_NAME if model_dir.is_dir() else None
    if trained is not None and trained.is_file():
        paths = pd.read_csv(trained, usecols=["path"], dtype=str)["path"]
        check_unseen(test, paths, f"the classifier's training set ({trained})")


def evaluate_predictions(
    manifest: Manifest,
    proba: np.ndarray,
    classes: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of predictions ``proba`` (N, C) against a manifest's labels."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in manifest.labels])
    test_labels = sorted(set(y.tolist()))
    patients = list(manifest.frame["patient"])
    result: dict[str, Any] = {
        "classes": classes,
        "test_classes": [classes[i] for i in test_labels],
        "images": len(manifest),
        "patients": len({p for p in patients if p}),
        "spaces": {},
        "per_domain": {},
        "per_class": {},
    }
    counts = resample_counts(len(y), patients, n_bootstrap, seed)  # the same for both spaces
    for space in SPACES:
        overall = metrics(y, proba, test_labels, space)
        ci = percentile_intervals(replicate_metrics(y, proba, test_labels, space, counts, HEADLINE))
        result["spaces"][space] = {
            "metrics": overall,
            "ci95": {k: list(v) for k, v in ci.items()},
            "bootstrap": {
                "resamples": n_bootstrap,
                "unit": "patient" if any(patients) else "image",
            },
        }
        result["per_class"][space] = per_class_table(y, proba, classes, test_labels, space)
        for domain in sorted(set(manifest.frame["domain"])):
            mask = (manifest.frame["domain"] == domain).to_numpy()
            labels_here = sorted(set(y[mask].tolist()))
            result["per_domain"].setdefault(domain, {"images": int(mask.sum())})[space] = metrics(
                y[mask], proba[mask], labels_here, space
            )
    confidence = proba.max(axis=1)
    ece, bins = expected_calibration_error(confidence, proba.argmax(axis=1) == y)
    result["calibration"] = {"space": "all_outputs", "ece": ece, "bins": bins}
    return result


def evaluate_model(
    model_dir: str | Path,
    test: Manifest,
    out: str | Path,
    cfg: EvaluateConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the classifier of training run ``model_dir`` on ``test``; write into ``out``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        DataError: If the model is missing, the test set is empty, a test label is unknown to
            the model, or an image is missing or unreadable.
    """
    cfg = cfg or EvaluateConfig()
    if len(test) == 0:
        raise DataError(f"the test manifest {test.origin} has no images")
    model, meta = load_classifier(model_dir)
    classes = list(meta["classes"])
    check_test_labels(test, classes)
    _check_unseen_by(Path(model_dir), test)
    run = RunDir(out, command="fulora evaluate").start(cfg)
    try:
        proba = predict_proba(
            model,
            meta,
            test,
            batch_size=cfg.batch_size,
            device=cfg.device,
            cache_dir=cfg.cache_dir,
            progress=progress,
        )
        result = evaluate_predictions(
            test, proba, classes, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed
        )
        result["model"] = {
            "run": str(Path(model_dir).resolve()),
            "arch": meta["arch"],
            "weights": meta["weights"],
            "epoch": meta.get("epoch"),
        }
        result["test"] = {"manifest": test.origin, "fingerprint": test.fingerprint()}
        out = run.path
        _write_tables(out, test, proba, classes, result)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[label] for label in test.labels])
        test_labels = [classes.index(c) for c in result["test_classes"]]
        for space in SPACES:
            pred = predict(restrict(proba, space, test_labels), space, test_labels)
            cm = confusion(y, pred, len(classes))[test_labels]
            cols = list(range(len(classes))) if space == "all_outputs" else test_labels
            acc = result["spaces"][space]["metrics"]["accuracy"]
            confusion_matrix_figure(
                out / f"confusion_matrix_{space}.png",
                cm[:, cols],
                result["test_classes"],
                [classes[c] for c in cols],
                title=f"{meta['arch']}: {space.replace('_', ' ')} (accuracy {acc:.1f}%)",
            )
        reliability_diagram(
            out / "reliability.png", result["calibration"]["bins"], result["calibration"]["ece"]
        )
        write_json(out / METRICS_NAME, result)
        run.finish(
            images=len(test), accuracy=result["spaces"]["all_outputs"]["metrics"]["accuracy"]
        )
    finally:
        run.close()
    return result


def _write_tables(
    out: Path, test: Manifest, proba: np.ndarray, classes: list[str], result: dict[str, Any]
) -> None:
    test_labels = [classes.index(c) for c in result["test_classes"]]
    frame = pd.DataFrame(
        {
            "path": test.frame["path"],
            "label": test.frame["label"],
            "predicted": [classes[i] for i in predict(proba, "all_outputs", test_labels)],
            "predicted_test_classes": [
                classes[i] for i in predict(proba, "test_classes", test_labels)
            ],
            "confidence": proba.max(axis=1).round(6),
            **{f"p_{c}": proba[:, i].round(6) for i, c in enumerate(classes)},
            "domain": test.frame["domain"],
            "patient": test.frame["patient"],
        }
    )
    with atomic_open(out / PREDICTIONS_NAME, "w", newline="") as handle:
        frame.to_csv(handle, index=False)
    rows = []
    for space in SPACES:
        entry = result["spaces"][space]
        row = {"space": space, "scope": "overall", "images": result["images"]}
        for k in HEADLINE:
            row[k] = round(entry["metrics"][k], 2)
            low_high = entry["ci95"].get(k)
            row[f"{k}_ci95"] = f"{low_high[0]:.2f}-{low_high[1]:.2f}" if low_high else ""
        rows.append(row)
        for domain, values in result["per_domain"].items():
            rows.append(
                {
                    "space": space,
                    "scope": domain,
                    "images": values["images"],
                    **{k: round(values[space][k], 2) for k in HEADLINE},
                }
            )
    with atomic_open(out / "metrics.csv", "w", newline="") as handle:
        pd.DataFrame(rows).to_csv(handle, index=False)
    per_class = [{"space": s, **r} for s in SPACES for r in result["per_class"][s]]
    with atomic_open(out / "per_class.csv", "w", newline="") as handle:
        pd.DataFrame(per_class).round(2).to_csv(handle, index=False)
