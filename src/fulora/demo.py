"""``fulora demo``: the whole method end to end on embedded data, offline, on a CPU.

Phantom images from two simulated machines (``source`` to train on, ``target`` as the unseen
cohort), a tiny Stable Diffusion-architecture model built in code, a short LoRA fine-tune,
synthetic images per plane, small classifiers for the regimes real-only and hybrid, and
zero-shot evaluation on the target machine. The tiny model has **random weights**: its
synthetic images are not ultrasound, so the hybrid regime here shows the plumbing, not the
method's gain. For real results pass a real SD1.5 model (see the README).

Every stage writes its own run folder under ``out`` and is skipped when already finished, so
a second ``make demo`` is quick and an interrupted one resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from fulora.classify.train import ClassifyConfig, train_classifier
from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.evaluate.run import evaluate_model
from fulora.generate.run import GenerateConfig, generate
from fulora.io import atomic_open
from fulora.lora.tiny import save_tiny_model
from fulora.lora.train import LoraTrainConfig, train_lora

logger = logging.getLogger("fulora")


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


def run_demo(
    out: str | Path, per_class: int = 24, seed: int = 0, synthetic_per_class: int = 24
) -> pd.DataFrame:
    """Run the demo into ``out``; returns the results table (also results.csv and .md)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fulora demo in {out}/ (tiny random model, phantom data; see the README for real runs)")
    source = generate_phantom(
        out / "phantom-source", PhantomConfig(per_class=per_class, domain="source", seed=seed)
    )
    target = generate_phantom(
        out / "phantom-target",
        PhantomConfig(per_class=per_class, domain="target", seed=seed, grid=False),
    ).with_values(split="test")
    model = out / "tiny-sd"
    if not (model / "model_index.json").is_file():
        save_tiny_model(model, seed=seed)
    print("[1/4] LoRA fine-tuning of the tiny model on the source images")
    lora_cfg = LoraTrainConfig(
        base=str(model),
        rank=8,
        alpha=8,
        resolution=64,
        bucket_step=16,
        repeats=1,
        max_steps=60,
        optimizer="adamw",
        unet_lr=1e-2,
        text_encoder_lr=1e-2,
        seed=seed,
        sample_every=30,
        sample_steps=8,
        output_name="demo_lora",
    )
    train_lora(source, out / "lora", lora_cfg)
    print("[2/4] generating synthetic images with the LoRA")
    generate(
        out / "synthetic",
        GenerateConfig(
            base=str(model),
            lora=str(out / "lora"),
            per_class=synthetic_per_class,
            steps=10,
            batch_size=synthetic_per_class,
            seed=seed,
            device="cpu",
            contact_sheet=5,
        ),
    )
    synthetic = Manifest.read(out / "synthetic" / "manifest.csv")
    print("[3/4] classifiers: real only, and hybrid (real + synthetic)")
    common = dict(
        arch="tiny_cnn",
        pretrained=False,
        image_size=64,
        epochs=12,
        batch_size=16,
        lr=0.01,
        seed=seed,
        cache_dir=str(out / "cache"),
    )
    regimes = {"real only": [source], "hybrid": [source, synthetic]}
    rows = []
    for name, manifests in regimes.items():
        slug = name.replace(" ", "-")
        record = train_classifier(manifests, out / f"classify-{slug}", ClassifyConfig(**common))
        print(f"[4/4] zero-shot evaluation of '{name}' on the target machine")
        result = evaluate_model(
            out / f"classify-{slug}",
            target,
            out / f"eval-{slug}",
            n_bootstrap=200,
            cache_dir=out / "cache",
        )
        for space, entry in result["spaces"].items():
            m = entry["metrics"]
            rows.append(
                {
                    "regime": name,
                    "label space": space,
                    "# real": record["train_images"] - record["train_synthetic"],
                    "# synthetic": record["train_synthetic"],
                    "ACC": round(m["accuracy"], 2),
                    "Recall": round(m["recall_macro"], 2),
                    "Precision": round(m["precision_macro"], 2),
                    "F1": round(m["f1_macro"], 2),
                    "AUC": round(m["auc_macro"], 2),
                    "paper AUC": round(m["paper_auc"], 2),
                }
            )
    table = pd.DataFrame(rows)
    with atomic_open(out / "results.csv", "w", newline="") as handle:
        table.to_csv(handle, index=False)
    with atomic_open(out / "results.md", "w") as handle:
        handle.write(markdown_table(table))
    print(
        "\nZero-shot results on the phantom target machine (test set "
        f"{len(target)} images, {target.frame['patient'].nunique()} patients):\n"
    )
    print(table.to_string(index=False))
    print(
        f"\nOutputs: {out}/ (lora/samples, synthetic/contact_*.png, eval-*/confusion_matrix_*"
        ".png, results.csv). The tiny model is NOT pretrained: its synthetic images are noise."
        "\nFor real results pass SD1.5 weights: fulora lora train --base PATH_OR_HUB_ID ..."
        "\nThe HTML report and the experiment runner are not built yet."
    )
    return table
