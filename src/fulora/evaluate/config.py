"""The configuration of ``fulora evaluate`` (and the evaluate section of an experiment)."""

from __future__ import annotations

from dataclasses import dataclass

from fulora.config import AT_LEAST_0, AT_LEAST_1, SEED, Checked


@dataclass
class EvaluateSettings(Checked):
    """What an evaluation computes: the keys of an experiment's ``evaluate`` section too."""

    RANGES = {"batch_size": AT_LEAST_1, "n_bootstrap": AT_LEAST_0, "seed": SEED}

    batch_size: int = 64
    n_bootstrap: int = 1000  # patient-level bootstrap resamples for the 95% intervals; 0: none
    seed: int = 0  # of the bootstrap


@dataclass
class EvaluateConfig(EvaluateSettings):
    """Configuration of ``fulora evaluate`` (saved as the run folder's ``config.yaml``)."""

    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    cache_dir: str | None = None  # preprocessing cache folder
