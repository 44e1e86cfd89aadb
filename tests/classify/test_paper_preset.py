"""The paper preset is the FU-LoRA notebook's classifier protocol, value for value (issue 17).

NOTEBOOK is read off `Replicate_All_Planes_Classification.ipynb` in the FU-LoRA repository
(github.com/13204942/FU-LoRA); each row names the cell it came from. The test resolves every
cell of the grid of `configs/fu-lora-paper.yaml` the way `fulora experiment run` does and
checks each against the table; torchvision (not fulora) is the reference for the resize.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fulora.classify.registry import create_model
from fulora.classify.train import ClassifyConfig, train_classifier
from fulora.data.images import resize_image
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.errors import ConfigError
from fulora.experiment.config import classifier_protocol, classify_config, load_experiment

REPO = Path(__file__).resolve().parents[2]

# ClassifyConfig key -> (the notebook's value, the cell and code it comes from)
NOTEBOOK = {
    "image_size": (224, "cell 24: transforms.Resize((224, 224))"),
    "resize": ("stretch-bilinear", "cell 24: Resize on a PIL image = PIL bilinear"),
    "normalize": ("none", "cell 24: transforms.Normalize([0, 0, 0], [1, 1, 1])"),
    "pretrained": (True, "cell 32: weights=..._Weights.IMAGENET1K_V1"),
    "imagenet_weights": ("IMAGENET1K_V1", "cell 32: IMAGENET1K_V1 for all five backbones"),
    "batch_size": (24, "cell 35: BATCH_SIZE = 24"),
    "epochs": (20, "cell 35: num_epochs = 20"),
    "optimizer": ("sgd", "cell 35: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)"),
    "lr": (1e-3, "cell 35: lr = 1e-3"),
    "momentum": (0.9, "cell 35: momentum=0.9"),
    "weight_decay": (0.0, "cell 35: SGD without weight_decay"),
    "label_smoothing": (0.0, "cell 35: torch.nn.CrossEntropyLoss()"),
    "schedule": ("constant", "cell 47: no learning-rate scheduler"),
    "amp": (False, "cell 47: plain fp32 forward and backward, no autocast"),
    "val_fraction": (0.0, "cells 41-42: trains on all of train_dataset; 'val' resamples it"),
    "select": ("last", "cells 49-51: the model after the last epoch is saved and tested"),
    "early_stopping": (0, "cell 47: the early-stopping lines are commented out"),
    "seed": (0, "cell 24: torch.manual_seed(0)"),
    "max_per_class": (None, "cells 36-38: every listed image"),
    "synthetic_ratio": (None, "cell 38: ConcatDataset of the real and synthetic sets"),
}
# Regime -> augment: cell 24 builds TRANSFORMS with COMMON_TR (the DA rows) or without.
AUGMENT = {"ES": "none", "ES+DA": "da", "HB": "none", "HB+DA": "da"}
PAPER_ARCHS = ["densenet169", "mobilenet_v2", "efficientnet_b0", "resnet18", "vit_b_16"]


def _experiment(name):
    return load_experiment(REPO / "configs" / name)


def test_every_cell_of_the_paper_grid_is_the_notebooks_protocol():
    cfg = _experiment("fu-lora-paper.yaml")
    assert cfg.classify.seeds == [0]  # one run, as the notebook
    assert set(cfg.classify.archs) == set(PAPER_ARCHS)
    assert set(cfg.classify.regimes) == set(AUGMENT)
    for regime, augment in AUGMENT.items():
        for arch in cfg.classify.archs:
            resolved = classify_config(cfg, regime, arch, 0)
            assert resolved.augment == augment, (regime, arch)
            for key, (value, cell) in NOTEBOOK.items():
                assert getattr(resolved, key) == value, f"{regime}/{arch} {key}: {cell}"


def test_the_sound_preset_differs_only_where_it_says():
    sound, paper = _experiment("fu-lora-sound.yaml"), _experiment("fu-lora-paper.yaml")
    a = classify_config(sound, "ES", "resnet18", 0)
    b = classify_config(paper, "ES", "resnet18", 0)
    differ = {k for k in ClassifyConfig.__dataclass_fields__ if getattr(a, k) != getattr(b, k)}
    assert differ == {
        "imagenet_weights",
        "resize",
        "normalize",
        "amp",
        "channels_last",
        "val_fraction",
        "select",
    }
    assert sound.classify.seeds == [0, 1, 2]
    for other in ("data", "lora", "generate", "audit", "evaluate"):
        assert getattr(sound, other) == getattr(paper, other), other
    assert sound.classify.regimes == paper.classify.regimes


def test_the_protocol_line_names_the_preset():
    paper = classifier_protocol(_experiment("fu-lora-paper.yaml"))
    assert paper.startswith("classify-paper.yaml: validation: none (every image trains)")
    assert "the last epoch of 20" in paper and "raw [0, 1] pixels" in paper
    assert "ImageNet IMAGENET1K_V1" in paper and "fp32" in paper and "one run (seed 0)" in paper
    sound = classifier_protocol(_experiment("fu-lora-sound.yaml"))
    assert "20% of real patients held out" in sound and "best epoch by f1_macro" in sound
    assert "mean of seeds [0, 1, 2]" in sound


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_stretch_bilinear_is_torchvisions_resize_pixel_for_pixel(mode):
    rng = np.random.default_rng(0)
    shape = (300, 410) if mode == "L" else (300, 410, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    ours = np.asarray(resize_image(img, (224, 224), "stretch-bilinear"))
    reference = np.asarray(transforms.Resize((224, 224))(img))  # the notebook's transform
    assert np.array_equal(ours, reference)


def test_v1_weights_are_asked_for_by_name(monkeypatch):
    """IMAGENET1K_V1 for MobileNet v2 is another file than torchvision's DEFAULT (V2)."""
    monkeypatch.setenv("FULORA_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub")
    with pytest.raises(ConfigError, match=r"mobilenet_v2-b0353104\.pth"):
        create_model("mobilenet_v2", 5, imagenet="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=r"mobilenet_v2-7ebf99e0\.pth"):
        create_model("mobilenet_v2", 5)
    with pytest.raises(ConfigError, match="timm model .* use imagenet_weights: DEFAULT"):
        create_model("timm:resnet10t", 5, imagenet="IMAGENET1K_V1")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return generate_phantom(
        tmp_path_factory.mktemp("phantom"), PhantomConfig(per_class=6, grid=False)
    )


def _tiny(tmp_path, **kw):
    base = dict(arch="tiny_cnn", pretrained=False, image_size=32, epochs=3, batch_size=16)
    return ClassifyConfig(**{**base, "cache_dir": str(tmp_path / "cache"), **kw})


def test_without_validation_every_image_trains_and_the_last_epoch_is_kept(phantom, tmp_path):
    cfg = _tiny(tmp_path, val_fraction=0.0, select="last", resize="stretch-bilinear")
    record = train_classifier([phantom], tmp_path / "run", cfg, progress=False)
    assert record["train_images"] == 30 and record["val_images"] == 0
    assert record["best_epoch"] == 3 and record["selected"] == "last"
    assert not (tmp_path / "run" / "val_manifest.csv").exists()
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["epoch"] == 3


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"select": "best"}, "select: best"),
        ({"select": "last", "early_stopping": 2}, "early_stopping"),
    ],
)
def test_what_needs_a_validation_set_is_refused_without_one(phantom, tmp_path, settings, named):
    cfg = _tiny(tmp_path, val_fraction=0.0, **settings)
    with pytest.raises(ConfigError, match=f"{named} needs a validation set"):
        train_classifier([phantom], tmp_path / "run", cfg, progress=False)
