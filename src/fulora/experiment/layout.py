"""The experiment folder's layout: the one place that knows where each thing lives.

::

    OUT/
      config.yaml  plan.csv  done.json  log.txt     the experiment's own (RunDir)
      stages.csv   each stage's outcome, node and seconds in the last run
      data/        train.csv, lora_train.csv, target-<name>.csv: the inputs as read
      lora/<variant>/                               a LoRA run folder
      synthetic/<variant>/manifest.csv              a generation run folder
      audit/<variant>/filtered.csv                  an audit run folder
      classify/<regime[@variant]>/<arch>/seed-<n>/  a classifier run folder
      evaluate/<target>/<same as classify>/         an evaluation run folder
      results/     results.csv/.md, per_domain.csv, comparison.csv, protocol.txt
      report/      report.html and its PNGs
      cache/       the preprocessing cache (unless cache_dir says otherwise)
      superseded/  outdated stage folders and earlier runs' top-level outputs

Every stage folder also holds ``stage.json`` (its key) beside the run's own files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fulora.data.manifest import MANIFEST_NAME
from fulora.runs import CONFIG_NAME, DONE_NAME

STAGE_MARKER = "stage.json"  # in every stage folder: the stage's name and key
PLAN_NAME = "plan.csv"
STAGE_RUNS_NAME = "stages.csv"


def slug(text: str) -> str:
    """A folder-safe version of a regime, variant or target name."""
    return "".join(c if c.isalnum() or c in "+-_.@=" else "_" for c in str(text)) or "_"


@dataclass(frozen=True)
class ExperimentLayout:
    """Paths inside one experiment folder ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        """The experiment's resolved config."""
        return self.root / CONFIG_NAME

    @property
    def plan(self) -> Path:
        """Every stage, its key, state at start and folder."""
        return self.root / PLAN_NAME

    @property
    def stage_runs(self) -> Path:
        """What became of each stage in the last run: state, node, seconds, log."""
        return self.root / STAGE_RUNS_NAME

    @property
    def done(self) -> Path:
        """Written last by a finished run."""
        return self.root / DONE_NAME

    @property
    def data(self) -> Path:
        """The input manifests as the run read them."""
        return self.root / "data"

    @property
    def results(self) -> Path:
        """The tables."""
        return self.root / "results"

    @property
    def protocol(self) -> Path:
        """One line: how the classifiers were trained and chosen (which preset ran)."""
        return self.results / "protocol.txt"

    @property
    def embedding(self) -> Path:
        """The t-SNE points of one classifier's features (the ``embedding`` stage)."""
        return self.root / "embedding"

    @property
    def report(self) -> Path:
        """The HTML report and its figures."""
        return self.root / "report"

    @property
    def cache(self) -> Path:
        """The default preprocessing cache."""
        return self.root / "cache"

    @property
    def superseded(self) -> Path:
        """Where outdated work is moved, never deleted."""
        return self.root / "superseded"

    #: The experiment's own outputs, rewritten by every run that changes anything.
    TOP_LEVEL = (CONFIG_NAME, DONE_NAME, PLAN_NAME, STAGE_RUNS_NAME, "data", "results", "report")

    def lora(self, variant: str) -> Path:
        """The LoRA run folder of ``variant``."""
        return self.root / "lora" / slug(variant)

    def synthetic(self, variant: str) -> Path:
        """The generation run folder of ``variant``."""
        return self.root / "synthetic" / slug(variant)

    def synthetic_manifest(self, variant: str) -> Path:
        """The generated images of ``variant``."""
        return self.synthetic(variant) / MANIFEST_NAME

    def audit(self, variant: str) -> Path:
        """The audit run folder of ``variant``'s images."""
        return self.root / "audit" / slug(variant)

    def filtered(self, variant: str) -> Path:
        """The audited images of ``variant`` that a filtered regime trains on."""
        return self.audit(variant) / "filtered.csv"

    def classifier(self, label: str, arch: str, seed: int) -> Path:
        """A classifier run folder (``label``: the regime, with ``@variant`` if several)."""
        return self.root / "classify" / slug(label) / slug(arch) / f"seed-{seed}"

    def evaluation(self, target: str, classifier: Path) -> Path:
        """The evaluation of the classifier in folder ``classifier`` on ``target``."""
        return (
            self.root / "evaluate" / slug(target) / classifier.relative_to(self.root / "classify")
        )

    def target_manifest(self, target: str) -> Path:
        """The target cohort as the run read it."""
        return self.data / f"target-{slug(target)}.csv"
