"""Config errors are reported before any work, with the key and the file (table-driven)."""

from __future__ import annotations

import shutil

import pytest

from fulora.cli import main
from fulora.data.manifest import Manifest
from fulora.experiment.config import load_experiment

from .conftest import write_config


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


CASES = [
    # (id, changes to the config, texts the message must contain)
    ("top-level key", {"epochs": 3}, ["unknown config key 'epochs'", "experiment.yaml"]),
    ("nested key", {"evaluate.bootstraps": 3}, ["'evaluate.bootstraps'", "experiment.yaml"]),
    ("lora key", {"lora.settings.rnak": 3}, ["'lora.settings.rnak'", "experiment.yaml"]),
    (
        "variant key",
        {"lora.variants": {"r4": {"rank": 4, "alfa": 4}}},
        ["'lora.variants.r4.alfa'", "experiment.yaml"],
    ),
    (
        "regime key",
        {"classify.regimes": {"ES": {"augmnt": "da"}}},
        ["'classify.regimes.ES.augmnt'", "experiment.yaml"],
    ),
    ("bad value", {"classify.settings.epochs": "many"}, ["'classify.settings.epochs'", "int"]),
    ("bad literal", {"classify.settings.augment": "heavy"}, ["'classify.settings.augment'"]),
    ("unknown arch", {"classify.archs": ["resnet_19x"]}, ["resnet_19x", "experiment.yaml"]),
    (
        "missing path",
        {"data.train": ["/nowhere/images"]},
        ["'data.train[0]'", "/nowhere/images", "does not exist", "experiment.yaml"],
    ),
    (
        "missing target",
        {"data.targets": {"africa": {"path": "/nowhere/africa", "split": "test"}}},
        ["'data.targets.africa'", "/nowhere/africa"],
    ),
    ("missing variable", {"data.train": ["${nowhere}/x"]}, ["${nowhere}", "variables.nowhere"]),
    (
        "missing base",
        {"base": "/nowhere/sd15"},
        ["'base'", "experiment.yaml", "/nowhere/sd15 does not exist"],
    ),
    ("missing recipe", {"lora.recipe": "no-such-recipe.yaml"}, ["no-such-recipe.yaml"]),
    ("missing comparison", {"compare": "/nowhere/table.csv"}, ["'compare'", "/nowhere/table.csv"]),
    (
        "regime flag",
        {"classify.regimes": {"HB": {"synthetic": "yes please"}}},
        ["'classify.regimes.HB.synthetic'", "true or false"],
    ),
    ("no regimes", {"classify.regimes": {}}, ["'classify.regimes'", "empty"]),
    (
        "unknown baseline",
        {"classify.regimes": {"ES": {}, "HB": {"synthetic": True, "baseline": "EX"}}},
        ["'classify.regimes.HB.baseline'", "'EX' is not another regime", "one of ES"],
    ),
    (
        "a real-only regime against a hybrid one",
        {"classify.regimes": {"ES": {"baseline": "HB"}, "HB": {"synthetic": True}}},
        ["'classify.regimes.ES.baseline'", "name the baseline on HB instead"],
    ),
    (
        "its own baseline",
        {"classify.regimes": {"ES": {}, "HB": {"synthetic": True, "baseline": "HB"}}},
        ["'classify.regimes.HB.baseline'", "'HB' is not another regime"],
    ),
    (
        "filtered without real-only",
        {"classify.regimes": {"HB": {"filtered": True}}},
        ["needs a classifier trained on real images"],
    ),
    (
        "audit classifier",
        {"classify.regimes": {"ES": {}, "F": {"filtered": True}}, "audit.classifier": "XX/a/b"},
        ["'audit.classifier'", "ES/tiny_cnn/seed-0"],
    ),
    ("audit key", {"audit.settings": {"near_copy": 0.9}}, ["'audit.settings.near_copy'"]),
    (
        "an audit ensemble by path",  # the experiment picks its seeds: audit.classifier REGIME/ARCH
        {"audit.settings": {"ensemble": ["runs/a"]}},
        ["'audit.settings.ensemble'", "set 'audit.classifier' instead", "REGIME/ARCH"],
    ),
    (
        "no validation images",  # once refused by the first classifier, after the LoRA and images
        {"classify.settings.val_fraction": 0.0, "classify.settings.select": "best"},
        ["'classify.regimes.ES'", "select: best needs validation images", "val_fraction"],
    ),
    ("one plane", {"data.planes": ["brain"]}, ["'data.planes'", "two or more"]),
    ("a seed twice", {"classify.seeds": [0, 0]}, ["'classify.seeds'", "twice"]),
    ("an arch twice", {"classify.archs": ["tiny_cnn", "tiny_cnn"]}, ["'classify.archs'", "twice"]),
    (
        "too few patients to hold out",  # once refused by the first classifier, after the images
        {"classify.settings.val_fraction": 0.1},
        ["'classify.regimes.ES'", "cannot hold out 10% by patient", "val_fraction"],
    ),
    (
        "image size the arch cannot take",  # once refused by the vit classifier, after the LoRA
        {"classify.archs": ["tiny_cnn", "vit_b_16"]},
        ["'classify.settings.image_size'", "vit_b_16 needs image_size 224, got 32"],
    ),
    ("misspelt sampler", {"generate.settings.sampler": "Euler b"}, ["unknown sampler 'Euler b'"]),
    # One device per experiment: the runner checks only the top-level one and Ray gives tasks
    # GPUs by it, so a stage's own device once failed only when that stage started.
    ("stage device", {"classify.settings.device": "cuda:1"}, ["'classify.settings.device'"]),
    ("regime device", {"classify.regimes": {"ES": {"device": "cpu"}}}, ["'classify.regimes.ES."]),
    ("lora device", {"lora.settings.device": "cuda"}, ["'lora.settings.device'", "top-level"]),
    ("generate device", {"generate.settings.device": "cpu"}, ["'generate.settings.device'"]),
    (  # the LoRA's file name is its output_name: known before it trains
        "a prompt's tag names another LoRA",
        {"generate.settings.prompts": {"brain": "fetal brain <lora:other:0.8>"}},
        ["generate.settings in", "for the LoRA of variant", "other than the run's"],
    ),
    (
        "generation owns lora",
        {"generate.settings.lora": "x.safetensors"},
        ["'generate.settings.lora'"],
    ),
]


@pytest.mark.parametrize("changes,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error_before_any_work(experiment_config, tmp_path, capsys, changes, expected):
    for key, value in changes.items():
        _set(experiment_config, key, value)
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    out = tmp_path / "run"
    assert main(["experiment", "run", str(path), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    for text in expected:
        assert text in message, message
    assert not out.exists()  # nothing was started


def test_a_training_set_of_one_plane_is_refused(
    experiment_config, phantom_domains, tmp_path, capsys
):
    """Found out by the first classifier once, after the LoRA trained and the images were made."""
    from fulora.data.manifest import Manifest

    brain = Manifest.read(phantom_domains / "source" / "manifest.csv").select(labels=["brain"])
    brain.write(tmp_path / "brain.csv")
    experiment_config["data"]["train"] = [str(tmp_path / "brain.csv")]
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    assert main(["experiment", "run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "'data.train' in" in (err := capsys.readouterr().err) and "one plane (brain)" in err
    assert not (tmp_path / "run").exists()


def test_a_target_cohort_of_training_images_is_refused(experiment_config, tmp_path, capsys):
    """Once a zero-shot table inflated by images the classifiers trained on."""
    experiment_config["data"]["targets"]["again"] = experiment_config["data"]["train"][0]
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    assert main(["experiment", "run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'data.targets.again' in" in err and "18 of the 18 test images" in err, err
    assert "are in the experiment's training or LoRA images" in err
    assert not (tmp_path / "run").exists()


def test_a_target_cohort_with_a_copy_of_a_training_image_is_refused(
    experiment_config, phantom_domains, tmp_path, capsys
):
    """A training image under another name in the target cohort: the same bytes, refused."""
    source = Manifest.read(phantom_domains / "source" / "manifest.csv")
    copied = tmp_path / "cohort" / "renamed.png"
    copied.parent.mkdir()
    shutil.copyfile(source.paths[4], copied)
    target = Manifest.read(phantom_domains / "target" / "manifest.csv")
    copy_row = Manifest.from_records([{"path": copied, "label": source.labels[4]}])
    Manifest.concat([target, copy_row]).write(tmp_path / "cohort" / "manifest.csv")
    experiment_config["data"]["targets"]["target"] = str(tmp_path / "cohort" / "manifest.csv")
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    assert main(["experiment", "run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'data.targets.target' in" in err and "1 of the 19 test images" in err, err
    assert "byte-for-byte copies of images in the experiment's training or LoRA images" in err
    assert f"renamed.png, the same bytes as {source.paths[4]}" in err
    assert not (tmp_path / "run").exists()


def test_unknown_target_label_is_named(experiment_config, tmp_path, capsys):
    experiment_config["data"]["planes"] = ["brain", "femur"]  # the target also has abdomen
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    assert main(["experiment", "run", str(path), "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err
    assert "'data.targets.target'" in message and "'abdomen'" in message


def test_overrides_and_variables(experiment_config, tmp_path, monkeypatch):
    experiment_config["variables"] = {"images": "/data/a"}
    experiment_config["data"]["train"] = ["${images}/train", "${HOME_OF_IMAGES}/more"]
    experiment_config["base_config"] = "${empty}"
    experiment_config["variables"]["empty"] = ""
    monkeypatch.setenv("HOME_OF_IMAGES", "/env")
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    cfg = load_experiment(path, ["variables.images=/data/b", "classify.seeds=[3, 4]"])
    assert [s.path for s in cfg.data.train] == ["/data/b/train", "/env/more"]
    assert cfg.classify.seeds == [3, 4]
    assert cfg.base_config is None  # an empty variable alone means "not set"


def test_every_stage_runs_on_the_experiments_device(experiment_config, tmp_path):
    """The LoRA once took the GPU whenever there was one (the demo's ``--device cpu`` too), and
    a classifier recipe's device overrode the experiment's."""
    from fulora.experiment.resolve import resolve_configs

    (tmp_path / "classifier.yaml").write_text("device: cuda\nepochs: 2\n")
    (tmp_path / "lora.yaml").write_text("device: cuda\nrank: 2\n")
    experiment_config["classify"]["recipe"] = "classifier.yaml"
    experiment_config["lora"]["recipe"] = "lora.yaml"
    experiment_config["lora"]["variants"] = {"r2": {}}
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    configs = resolve_configs(load_experiment(path), tmp_path / "run")
    stages = [*configs.loras.values(), *configs.generation.values(), *configs.classifiers.values()]
    assert len(stages) == 4 and {c.device for c in stages} == {"cpu"}
    assert configs.loras["r2"].rank == 2 and {c.epochs for c in configs.classifiers.values()} == {2}


def test_lora_variants_that_differ_only_by_seed_are_replicates(experiment_config, tmp_path):
    """The effects table pools them (another LoRA run's spread in the interval)."""
    from fulora.experiment.config import lora_replicates

    experiment_config["lora"]["variants"] = {
        "r4": {"rank": 4, "alpha": 4},
        "r8": {"rank": 8, "alpha": 8},
        "r4-seed1": {"rank": 4, "alpha": 4, "seed": 1},
        "r4-seed2": {"rank": 4, "alpha": 4, "seed": 2},
        "r4-again": {"rank": 4, "alpha": 4},  # r4's seed: the same run again, not pooled
        "r4-lr": {"rank": 4, "alpha": 4, "seed": 3, "unet_lr": 1e-3},
        "released": {"file": str(tmp_path / "x.safetensors")},  # not trained: not a replicate
    }
    (tmp_path / "x.safetensors").write_bytes(b"")
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    assert lora_replicates(load_experiment(path)) == [["r4", "r4-seed1", "r4-seed2"]]


def test_paper_config_resolves(tmp_path, capsys, sample_data):
    """configs/fu-lora-paper.yaml parses, and its first missing input is named precisely."""
    from pathlib import Path

    from fulora.experiment.config import classify_config, lora_configs

    path = Path(__file__).parents[2] / "configs" / "fu-lora-paper.yaml"
    sets = ["variables.fetal_planes_db=/nowhere/fpdb", f"variables.sample={sample_data}"]
    cfg = load_experiment(path, sets)
    assert {k: v.rank for k, v in lora_configs(cfg).items()} == {"r128": 128, "r32": 32, "r8": 8}
    hb = classify_config(cfg, "HB+DA", "resnet18", 0)
    assert (hb.augment, hb.epochs, hb.lr, hb.batch_size) == ("da", 20, 1e-3, 24)
    args = ["experiment", "run", str(path), "--dry-run", "--set", sets[0], "--set", sets[1]]
    assert main(args) == 2
    assert "/nowhere/fpdb/Images" in capsys.readouterr().err
