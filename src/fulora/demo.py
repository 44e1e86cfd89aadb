"""``fulora demo``: the FU-LoRA method on embedded data, offline, on a CPU, in minutes.

The paper's premise in the phantom world (``fulora.data.phantom``): 20 images per plane from
one simulated machine (``source``, the paper's Spain) for the LoRA and the real-only
classifiers; another machine (``target``, the paper's Africa) that nothing trains on as the
zero-shot test; and fulora's pretrained tiny foundation model (``fulora:phantom-sd``, SD1.5's
stand-in) as the base. The experiment runs the real pipeline: a LoRA fine-tune that teaches
the model the plane words, a few hundred synthetic images, an audit of them (fidelity,
near-copies, class consistency), small classifiers for the regimes real-only, hybrid and
hybrid with audited images only (three seeds each), zero-shot evaluation on the target
machine with confidence intervals, the results table and the HTML report. Whatever the table
says is what was measured. For the paper's own experiment run ``configs/fu-lora-paper.yaml``
with SD1.5 weights (see the README).

The experiment file is written to ``OUT/experiment.yaml``; ``fulora experiment run
OUT/experiment.yaml --out OUT`` reruns it, and a second ``make demo`` skips finished stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fulora.config import check_device, require_device
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.experiment.config import load_experiment
from fulora.experiment.effects import display_effects
from fulora.experiment.results import display_table
from fulora.experiment.runner import run_experiment
from fulora.io import write_text
from fulora.shipped import PHANTOM_SD

logger = logging.getLogger("fulora")

#: The demo's LoRA recipe on ``fulora:phantom-sd`` (also used by tests/foundation): the paper's
#: layer set and clip skip 2; 64 px buckets (the source images land in 64x48, the model's
#: size); a short fine-tune at a high rate, sized for 2 CPU cores.
DEMO_LORA: dict[str, Any] = {
    "rank": 16,
    "alpha": 16,
    "resolution": 64,
    "bucket_step": 16,
    "batch_size": 4,
    "repeats": 10,
    "max_steps": 300,
    "optimizer": "adamw",
    "unet_lr": 1e-3,
    "text_encoder_lr": 5e-4,
    "clip_skip": 2,
    "seed": 0,
    "sample_every": 0,
    "sample_steps": 20,
    "output_name": "demo_lora",
}
#: The demo's generation settings (the size comes from the LoRA's bucket: 64x48).
DEMO_GENERATE: dict[str, Any] = {
    "sampler": "dpmpp_2m_karras",
    "steps": 20,
    "guidance": 5.0,
    "clip_skip": 2,
    "seed": 0,
}


def demo_experiment(
    out: Path,
    *,
    seed: int = 0,
    synthetic_per_class: int = 60,
    report: bool = True,
    lora_steps: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The demo's experiment config (a YAML-ready mapping) for data already in ``out``."""
    lora = {k: v for k, v in DEMO_LORA.items() if k not in ("rank", "alpha")}
    if lora_steps is not None:
        lora["max_steps"] = lora_steps
    return {
        "name": "demo",
        "description": "phantom source machine -> phantom target machine, fulora:phantom-sd",
        "base": PHANTOM_SD,
        "device": device,
        "data": {
            "lora": [str(out / "phantom-source")],
            "train": [str(out / "phantom-source")],
            "targets": {"phantom-target": str(out / "phantom-target")},
        },
        "lora": {
            "settings": lora | {"seed": seed},
            "variants": {"r16": {"rank": DEMO_LORA["rank"], "alpha": DEMO_LORA["alpha"]}},
        },
        "generate": {
            "settings": DEMO_GENERATE
            | {"per_class": synthetic_per_class, "batch_size": 30, "seed": seed, "contact_sheet": 5}
        },
        "classify": {
            "settings": {
                "pretrained": False,
                "image_size": 64,
                "epochs": 12,
                "batch_size": 16,
                "lr": 0.01,
                "optimizer": "sgd",
                # the decoded set as one uint8 tensor, batches cut from it (the GPU's path): a
                # hybrid classifier trained in 15.1 s instead of 29.1 s through a DataLoader on
                # a 2-core AMD EPYC; the same protocol, though its shuffle draws other numbers
                "preload": True,
            },
            "archs": ["tiny_cnn"],
            "seeds": [seed, seed + 1, seed + 2],
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
    per_class: int = 20,
    seed: int = 0,
    synthetic_per_class: int = 60,
    report: bool = True,
    lora_steps: int | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Run the demo into ``out``; returns the results table (``out/results/results.csv``).

    ``lora_steps`` shortens the LoRA fine-tune (tests); the demo's is ``DEMO_LORA``'s.
    ``device``: the demo is sized for a CPU; ``cuda`` runs every stage on the GPU (fp16
    generation, so other images and numbers than the CPU's).

    Raises:
        ConfigError: For a device this machine lacks, before any work.
    """
    check_device(device)
    require_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fulora demo in {out}/ ({PHANTOM_SD} and phantom data; see the README for SD1.5)")
    generate_phantom(
        out / "phantom-source", PhantomConfig(per_class=per_class, domain="source", seed=seed)
    )
    generate_phantom(
        out / "phantom-target",
        PhantomConfig(per_class=per_class, domain="target", seed=seed, grid=False),
    )
    config = demo_experiment(
        out.resolve(),
        seed=seed,
        synthetic_per_class=synthetic_per_class,
        report=report,
        lora_steps=lora_steps,
        device=device,
    )
    write_text(out / "experiment.yaml", yaml.safe_dump(config, sort_keys=False))
    cfg = load_experiment(out / "experiment.yaml")
    record = run_experiment(cfg, out)
    table = record["table"]
    shown = display_table(table, "all_outputs", "phantom-target")
    print("\nZero-shot results on the phantom target machine (all outputs, 3 seeds):\n")
    print(shown.to_string(index=False))
    _print_effects(out / "results" / "effects.csv")
    print(
        f"\nOutputs: {out}/results/results.md, {out}/synthetic/r16/contact_*.png"
        + (f"\nReport:  {record['report']}" if record.get("report") else "")
        + f"\nThe base model is {PHANTOM_SD}, fulora's tiny pretrained model; for the paper's "
        "experiment with SD1.5: fulora experiment run configs/fu-lora-paper.yaml "
        "--set variables.sd15=PATH_OR_HUB_ID (see the README)."
    )
    return table


def _print_effects(path: Path) -> None:
    """Each hybrid regime against real-only, as ``results/effects.csv`` has it."""
    if not path.is_file():
        return
    effects = pd.read_csv(path, keep_default_na=False, na_values=[""])
    shown = display_effects(effects, "all_outputs", "phantom-target")
    print("\nAgainst real-only (difference of seed means, 95% interval over the test patients and")
    print("the classifier seeds; one that holds 0 does not tell the regime from real-only, and")
    print("it leaves out how much another LoRA run and its images would differ):\n")
    print(shown.drop(columns=["LoRA", "baseline"], errors="ignore").to_string(index=False))
