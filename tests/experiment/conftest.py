"""A small experiment on phantom data and the tiny SD model, run once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fulora.data.phantom import PhantomConfig, generate_phantom

PLANES = ["abdomen", "brain", "femur"]


@pytest.fixture(scope="session")
def phantom_domains(tmp_path_factory):
    """Phantom source (training) and target (unseen cohort) folders, small."""
    root = tmp_path_factory.mktemp("phantom")
    for domain in ("source", "target"):
        generate_phantom(
            root / domain,
            PhantomConfig(per_class=6, domain=domain, planes=PLANES, size=(48, 64), grid=False),
        )
    return root


def small_config(model: Path, data: Path) -> dict:
    """A complete experiment that runs in seconds on a CPU."""
    return {
        "name": "small",
        "base": str(model),
        "device": "cpu",
        "data": {
            "lora": [str(data / "source")],
            "train": [str(data / "source")],
            "targets": {"target": str(data / "target")},
        },
        "lora": {
            "settings": {
                "resolution": 64,
                "bucket_step": 16,
                "repeats": 1,
                "max_steps": 4,
                "optimizer": "adamw",
                "unet_lr": 1e-2,
                "text_encoder_lr": 1e-2,
                "sample_steps": 2,
                "output_name": "small",
            },
            "variants": {"r4": {"rank": 4, "alpha": 4}},
        },
        "generate": {
            "settings": {
                "per_class": 4,
                "planes": PLANES,
                "steps": 2,
                "batch_size": 4,
                "width": 64,
                "height": 48,
                "contact_sheet": 2,
            }
        },
        "classify": {
            "settings": {
                "pretrained": False,
                "image_size": 32,
                "epochs": 2,
                "batch_size": 8,
                "lr": 0.01,
            },
            "archs": ["tiny_cnn"],
            "seeds": [0],
            "regimes": {"ES": {}, "HB": {"synthetic": True}},
        },
        "evaluate": {"n_bootstrap": 20},
        "report": {"embedding_per_group": 6, "grid_per_plane": 2},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def experiment_config(tiny_model, phantom_domains):
    """A fresh copy of the small experiment's mapping."""
    return copy.deepcopy(small_config(tiny_model, phantom_domains))


@pytest.fixture(scope="session")
def finished_experiment(tiny_model, phantom_domains, tmp_path_factory, one_torch_thread):
    """The small experiment run to the end once (folder), shared by read-only tests.

    On one torch thread, as Ray runs each 1-CPU stage: test_ray compares its Ray run with this
    one image for image (a thread count changes the summation order of CPU matrix products).
    """
    from fulora.experiment.config import load_experiment
    from fulora.experiment.runner import run_experiment

    root = tmp_path_factory.mktemp("experiment")
    config = small_config(tiny_model, phantom_domains)
    config["classify"]["seeds"] = [0, 1]
    config["classify"]["regimes"]["HB-filtered"] = {"filtered": True}
    config["audit"] = {"settings": {"min_confidence": 0.0, "kid_subsets": 10}}
    path = write_config(root / "experiment.yaml", config)
    with one_torch_thread():
        run_experiment(load_experiment(path), root / "run")
    return root / "run"
