"""The paper's released artifacts stand in for stages (issue 17): a LoRA file instead of LoRA
training, a synthetic image set (AUTOMATIC1111 names, labels in a CSV) instead of generation."""

import shutil

import pandas as pd
import pytest

from fulora.errors import ConfigError
from fulora.experiment.config import load_experiment
from fulora.experiment.runner import plan_experiment, run_experiment

from .conftest import PLANES, small_config, write_config

PAPER_NAMES = {"abdomen": "Fetal abdomen", "brain": "Fetal brain", "femur": "Fetal femur"}


def _released_set(folder, source):
    """The paper's layout: synthetic_train_5000.csv beside synthetic_train_5000/<index-seed>.png."""
    images = folder / "synthetic_train_5000"
    images.mkdir(parents=True)
    rows = []
    for index, plane in enumerate(p for p in PLANES for _ in range(3)):
        name = f"{index:05d}-{2671683618 + index}"
        shutil.copy(sorted((source / plane).glob("*.png"))[index % 3], images / f"{name}.png")
        rows.append({"Image_name": name, "Plane": PAPER_NAMES[plane], "Train": 1})
    csv = folder / "synthetic_train_5000.csv"
    pd.DataFrame(rows).to_csv(csv, index=False, encoding="utf-8-sig")  # with a BOM, as released
    return csv


@pytest.fixture
def released_config(tiny_model, phantom_domains, trained_lora, tmp_path):
    config = small_config(tiny_model, phantom_domains)
    lora_file = trained_lora / "phantom_lora.safetensors"
    csv = _released_set(tmp_path / "zenodo", phantom_domains / "source")
    config["lora"]["variants"] = {"v1": {"file": str(lora_file)}, "set": {"images": str(csv)}}
    return config


def test_released_lora_and_images_replace_their_stages(released_config, tmp_path):
    path = write_config(tmp_path / "experiment.yaml", released_config)
    plan = plan_experiment(load_experiment(path), tmp_path / "run")
    kinds = [s.kind for s in plan.stages]
    assert "lora" not in kinds and kinds.count("generate") == 1  # only the LoRA file generates
    assert {s.name for s in plan.stages if s.kind == "classify"} == {
        "classify/ES/tiny_cnn/seed-0",
        "classify/HB@v1/tiny_cnn/seed-0",
        "classify/HB@set/tiny_cnn/seed-0",
    }
    run_experiment(load_experiment(path), tmp_path / "run")
    (hb_set,) = [s.folder for s in plan.stages if s.name == "classify/HB@set/tiny_cnn/seed-0"]
    used = pd.read_csv(hb_set / "train_manifest.csv")
    synthetic = used[used["source"] == "synthetic"]
    assert len(synthetic) == 9 and synthetic["label"].value_counts().to_dict() == dict.fromkeys(
        PLANES, 3
    )
    assert set(synthetic["seed"]) == {2671683618 + i for i in range(9)}  # parsed from the names
    table = pd.read_csv(tmp_path / "run/results/results.csv", keep_default_na=False)
    assert set(table["LoRA"]) == {"", "v1", "set"}
    protocol = (tmp_path / "run/results/protocol.txt").read_text()
    assert protocol.startswith("validation: 20% of real patients held out")
    assert "Classifier protocol" in (tmp_path / "run/report/report.html").read_text()


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"file": "/nowhere/lora.safetensors"}, "fu-lora-loras"),
        ({"file": "x.safetensors", "rank": 8}, "takes no other key"),
        ({"images": {"path": "a.csv", "colour": "L"}}, "colour"),
    ],
)
def test_bad_released_variants_are_named(released_config, tmp_path, variant, message):
    released_config["lora"]["variants"] = {"bad": variant}
    path = write_config(tmp_path / "experiment.yaml", released_config)
    with pytest.raises(ConfigError, match=message) as err:
        plan_experiment(load_experiment(path), tmp_path / "run")
    assert "lora.variants.bad" in str(err.value)
