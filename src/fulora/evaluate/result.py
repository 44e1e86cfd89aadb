"""What an evaluation folder holds, read back as typed records (the results table's input).

``fulora evaluate`` writes ``metrics.json`` and ``predictions.csv``; the experiment's results
table and report read them through :meth:`Evaluation.read` rather than indexing raw JSON, so
a renamed key fails here, naming the file, and not as a ``KeyError`` deep in a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fulora.errors import DataError

METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"


@dataclass(frozen=True)
class SpaceScores:
    """The headline metrics under one label space, with their bootstrap 95% intervals."""

    metrics: dict[str, float]
    ci95: dict[str, tuple[float, float]]  # empty when the bootstrap was off
    resamples: int
    unit: str  # "patient" or "image": what the bootstrap resampled

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> SpaceScores:
        """From one ``metrics.json`` ``spaces`` entry."""
        boot = entry.get("bootstrap", {})
        return cls(
            metrics={k: float(v) for k, v in entry["metrics"].items()},
            ci95={k: (float(v[0]), float(v[1])) for k, v in entry.get("ci95", {}).items()},
            resamples=int(boot.get("resamples", 0)),
            unit=str(boot.get("unit", "image")),
        )


@dataclass(frozen=True)
class DomainScores:
    """One domain's (e.g. country's) metrics under each label space."""

    images: int
    spaces: dict[str, dict[str, float]]


def _domain(entry: dict[str, Any]) -> DomainScores:
    spaces = {space: scores for space, scores in entry.items() if space != "images"}
    return DomainScores(images=int(entry["images"]), spaces=spaces)


@dataclass(frozen=True)
class Evaluation:
    """One classifier on one test cohort: ``metrics.json`` plus ``predictions.csv``."""

    folder: Path
    classes: list[str]  # the model's outputs, in its order
    test_classes: list[str]  # the planes present in the test set
    images: int
    spaces: dict[str, SpaceScores]
    per_domain: dict[str, DomainScores]
    predictions: pd.DataFrame  # path, label, p_<class> ..., domain, patient

    @classmethod
    def read(cls, folder: str | Path) -> Evaluation:
        """Read an evaluation folder.

        Raises:
            DataError: A file is missing or unreadable, or lacks a key, naming the file.
        """
        folder = Path(folder)
        path = folder / METRICS_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            predictions = pd.read_csv(folder / PREDICTIONS_NAME, keep_default_na=False)
            return cls(
                folder=folder,
                classes=list(raw["classes"]),
                test_classes=list(raw["test_classes"]),
                images=int(raw["images"]),
                spaces={s: SpaceScores.from_json(e) for s, e in raw["spaces"].items()},
                per_domain={d: _domain(v) for d, v in raw["per_domain"].items()},
                predictions=predictions,
            )
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read the evaluation in {folder}: {err}") from None
        except KeyError as err:
            raise DataError(f"{path} has no {err} entry: rerun its evaluation") from None

    def labels(self) -> np.ndarray:
        """Each test image's true class, as an index into :attr:`classes`."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[label] for label in self.predictions["label"]])

    def probabilities(self) -> np.ndarray:
        """The class probabilities (N, C) in the order of :attr:`classes`."""
        columns = [f"p_{c}" for c in self.classes]
        return self.predictions[columns].to_numpy(dtype=float)

    def test_labels(self) -> list[int]:
        """The indices of the planes present in the test set."""
        return [self.classes.index(c) for c in self.test_classes]
