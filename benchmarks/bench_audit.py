"""The audit on real vs real images: what "a different but real distribution" scores.

1. Trains ResNet18 from scratch on the 100 Spanish LoRA images (the paper's classifier
   protocol, no ImageNet weights offline) as the domain-specific feature extractor.
2. Runs `fulora audit` through the CLI on
   * different sites: the 217 African images as "synthetic" vs the Spanish images (reference
     and LoRA training set), and
   * same site: half of the Spanish images (odd rows) vs the other half (even rows),
   and prints the per-plane tables and timings.

Usage: python benchmarks/bench_audit.py [SAMPLE_DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_cli import cpu_name  # benchmarks/ is the script's folder, first on sys.path

from fulora.data.readers import read_any

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared/data/fu-lora-sample"


def fulora(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fulora", "-q", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sample", nargs="?", default=str(DEFAULT))
    parser.add_argument("--work", default="bench-audit")
    args = parser.parse_args()
    sample, work = Path(args.sample), Path(args.work)
    work.mkdir(exist_ok=True)
    spain = sample / "spain_lora_train"
    clf = work / "resnet18-spain"
    seconds = {}
    if not (clf / "done.json").is_file():
        seconds["train classifier"] = fulora(
            "classify", "train", "--config", str(REPO / "configs/classify-paper.yaml"),
            "--train", str(spain), "--arch", "resnet18", "--pretrained", "false",
            "--out", str(clf), "--cache-dir", str(work / "cache"),
        )  # fmt: skip
    manifest = read_any(spain)
    odd = np.arange(len(manifest)) % 2 == 1
    manifest.subset(odd).write(work / "spain_odd.csv")
    manifest.subset(~odd).write(work / "spain_even.csv")
    runs = {
        "different sites (Africa vs Spain)": (sample / "african_dev", spain, spain),
        "same site (Spain half vs half)": (
            work / "spain_odd.csv",
            work / "spain_even.csv",
            work / "spain_even.csv",
        ),
    }
    print(f"machine: {cpu_name()}, python {platform.python_version()}")
    for name, (synthetic, reference, train_set) in runs.items():
        out = work / name.split(" ")[0]
        seconds[name] = fulora(
            "audit", "--synthetic", str(synthetic), "--reference", str(reference),
            "--train-set", str(train_set), "--classifier", str(clf), "--out", str(out),
            "--cache-dir", str(work / "cache"),
        )  # fmt: skip
        result = json.loads((out / "audit.json").read_text())
        print(f"\n## {name}: {seconds[name]:.1f} s")
        print(
            pd.read_csv(out / "per_plane.csv").to_markdown(index=False)
            if hasattr(pd.DataFrame, "to_markdown") and _has_tabulate()
            else pd.read_csv(out / "per_plane.csv").to_string(index=False)
        )
        print("memorisation:", json.dumps(result.get("memorisation", {}), indent=1)[:1500])
    print("\nseconds:", json.dumps(seconds, indent=1))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
