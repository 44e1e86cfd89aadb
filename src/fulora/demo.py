"""``fulora demo``: the whole experiment on embedded data, offline, on a CPU, in minutes.

Phantom images from two simulated machines (``source`` to train on, ``target`` as the unseen
cohort), a tiny Stable Diffusion-architecture model built in code, and an experiment config
that runs the real pipeline on them: a short LoRA fine-tune, a few hundred synthetic images,
an audit of the synthetic images (fidelity, near-copies, class consistency), small classifiers
for the regimes real-only, hybrid and hybrid with audited images only (two seeds each),
zero-shot evaluation on the target machine, the results table and the HTML report. The tiny
model has **random weights**: its synthetic images are not ultrasound, so the hybrid regime
here shows the plumbing, not the method's gain. For real results run
``configs/fu-lora-paper.yaml`` with SD1.5 weights (see the README).

The experiment file is written to ``OUT/experiment.yaml``; ``fulora experiment run
OUT/experiment.yaml --out OUT`` reruns it, and a second ``make demo`` skips finished stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.experiment.config import load_experiment
from fulora.experiment.results import display_table
from fulora.experiment.runner import run_experiment
from fulora.io import write_text
from fulora.lora.tiny import save_tiny_model

logger = logging.getLogger("fulora")


def demo_experiment(
    out: Path, *, seed: int = 0, synthetic_per_class: int = 60, report: bool = True
) -> dict[str, Any]:
    """The demo's experiment config (a YAML-ready mapping) for data already in ``out``."""
    return {
        "name": "demo",
        "description": "phantom source machine -> phantom target machine, tiny random SD model",
        "base": str(out / "tiny-sd"),
        "device": "cpu",
        "data": {
            "lora": [str(out / "phantom-source")],
            "train": [str(out / "phantom-source")],
            "targets": {"phantom-target": str(out / "phantom-target")},
        },
        "lora": {
            "settings": {
                "resolution": 64,
                "bucket_step": 16,
                "repeats": 1,
                "max_steps": 60,
                "optimizer": "adamw",
                "unet_lr": 1e-2,
                "text_encoder_lr": 1e-2,
                "seed": seed,
                "sample_every": 30,
                "sample_steps": 8,
                "output_name": "demo_lora",
            },
            "variants": {"r8": {"rank": 8, "alpha": 8}},
        },
        "generate": {
            "settings": {
                "per_class": synthetic_per_class,
                "steps": 10,
                "batch_size": 30,
                "seed": seed,
                "contact_sheet": 5,
            }
        },
        "classify": {
            "settings": {
                "pretrained": False,
                "image_size": 64,
                "epochs": 12,
                "batch_size": 16,
                "lr": 0.01,
                "optimizer": "sgd",
            },
            "archs": ["tiny_cnn"],
            "seeds": [seed, seed + 1],
            "regimes": {
                "real-only": {},
                "hybrid": {"synthetic": True},
                "hybrid-filtered": {"filtered": True},
            },
        },
        "audit": {"settings": {"kid_subsets": 20}},
        "evaluate": {"n_bootstrap": 200},
        "report": {"enabled": report, "embedding_per_group": 60, "grid_per_plane": 5},
    }


def run_demo(
    out: str | Path,
    per_class: int = 24,
    seed: int = 0,
    synthetic_per_class: int = 60,
    report: bool = True,
) -> pd.DataFrame:
    """Run the demo into ``out``; returns the results table (``out/results/results.csv``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fulora demo in {out}/ (tiny random model, phantom data; see the README for real runs)")
    generate_phantom(
        out / "phantom-source", PhantomConfig(per_class=per_class, domain="source", seed=seed)
    )
    generate_phantom(
        out / "phantom-target",
        PhantomConfig(per_class=per_class, domain="target", seed=seed, grid=False),
    )
    if not (out / "tiny-sd" / "model_index.json").is_file():
        save_tiny_model(out / "tiny-sd", seed=seed)
    config = demo_experiment(
        out.resolve(), seed=seed, synthetic_per_class=synthetic_per_class, report=report
    )
    write_text(out / "experiment.yaml", yaml.safe_dump(config, sort_keys=False))
    cfg = load_experiment(out / "experiment.yaml")
    record = run_experiment(cfg, out)
    table = record["table"]
    shown = display_table(table, "all_outputs", "phantom-target")
    print("\nZero-shot results on the phantom target machine (all outputs, 2 seeds):\n")
    print(shown.to_string(index=False))
    print(
        f"\nOutputs: {out}/results/results.md, {out}/synthetic/r8/contact_*.png"
        + (f"\nReport:  {record['report']}" if record.get("report") else "")
        + "\nThe tiny model is NOT pretrained: its synthetic images are noise, so 'hybrid' here "
        "tests the plumbing, not the method.\nFor real results pass SD1.5 weights: "
        "fulora experiment run configs/fu-lora-paper.yaml --set variables.sd15=PATH_OR_HUB_ID "
        "(see the README)."
    )
    return table
