"""``fulora demo``: run what fulora can do end to end on embedded data, with no downloads.

Today that is the data layer: phantom images from two simulated machines (``source`` for
training, ``target`` as the unseen cohort), their manifests with a patient-level validation
split, a class-balanced subsample, an inspection report and a sample grid. The LoRA, generation,
classifier and report stages join this command as they are built.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fulora.data.inspect import inspect_manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.runs import RunDir

logger = logging.getLogger("fulora")


def run_demo(out: str | Path, per_class: int = 24, seed: int = 0) -> dict[str, Path]:
    """Run the demo into ``out``; returns the paths of what it wrote."""
    out = Path(out)
    run = RunDir(out, command="fulora demo").start(
        PhantomConfig(per_class=per_class, domain="both", seed=seed)
    )
    try:
        source = generate_phantom(
            out / "phantom-source", PhantomConfig(per_class=per_class, domain="source", seed=seed)
        )
        target = generate_phantom(
            out / "phantom-target",
            PhantomConfig(per_class=per_class, domain="target", seed=seed, grid=False),
        )
        train = source.split_by_patient(0.2, seed=seed)
        train.write(out / "source_train_val.csv")
        balanced = train.select(split="train").balanced(
            min(train.select(split="train").counts("label").values()), seed=seed
        )
        balanced.write(out / "source_train_balanced.csv")
        target = target.with_values(split="test")
        target.write(out / "target_test.csv")
        reports = {
            name: inspect_manifest(m, layout="manifest")
            for name, m in (("source", train), ("target", target))
        }
        run.finish(source=len(source), target=len(target))
    finally:
        run.close()
    print(f"\nfulora demo: wrote {out}/")
    for name, report in reports.items():
        print(report.format().replace(report.origin, f"{name} ({report.origin})", 1))
    print(f"\n  sample grid: {out / 'phantom-source' / 'grid.png'}")
    print(
        "  Built so far: the data layer (phantom data, manifests, patient split, balancing,"
        " inspection). LoRA fine-tuning, generation, classifiers and the report are not yet"
        " part of fulora; this demo grows with them."
    )
    return {
        "source": out / "phantom-source" / "manifest.csv",
        "target": out / "target_test.csv",
        "train_val": out / "source_train_val.csv",
        "grid": out / "phantom-source" / "grid.png",
    }
