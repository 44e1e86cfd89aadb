"""The method learns: LoRA on the pretrained tiny foundation model (fulora:phantom-sd), on CPU.

The premise (``fulora.data.phantom``): the foundation model never saw a plane name; the LoRA
sees 20 images per plane from the ``source`` machine. An independent judge, a classifier
trained only on other real ``source`` images, then says which plane each generated image
shows. These tests fail if the training objective, the LoRA scale or the prompt encoding is
broken (each was broken on purpose once to check; see BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any
from fulora.demo import DEMO_GENERATE, DEMO_LORA
from fulora.generate.run import GenerateConfig, generate, image_path, image_seed
from fulora.planes import PAPER_PLANES
from fulora.shipped import PHANTOM_SD

PLANES = list(PAPER_PLANES)
# The demo's LoRA and generation recipes (kohya's layers and clip skip 2 as in the paper; a
# short fine-tune sized for 2 CPU cores). clip_skip is pinned so that base-model and LoRA
# images are encoded alike.
GEN = dict(
    DEMO_GENERATE, per_class=20, batch_size=10, width=64, height=48, device="cpu", contact_sheet=0
)
# Measured on the shipped model (BENCHMARKS.md): the judge calls LoRA images by their
# prompt's plane 76% of the time (base model: 20%, chance); thresholds leave a margin.
MIN_LORA_ACCURACY = 0.6
MAX_BASE_ACCURACY = 0.45
MAX_KID_RATIO = 0.8  # measured 0.58 (KID LoRA / KID base)
MIN_GREY_CHANGE = 0.5  # mean |difference| in grey levels (0-255); measured 1.6 to 12.4


def _judge_training_set(real: Manifest, out) -> Manifest:
    """The judge's training images: real source images at the model's 64x48, each also blurred.

    The VAE keeps shapes but not speckle, so a judge that learnt speckle calls even VAE
    reconstructions of real images wrong (measured: brain 0%, abdomen 15%); blurred copies of
    real images teach it to judge the anatomy (95% on those reconstructions).
    """
    rows = []
    for path, label in zip(real.paths, real.labels, strict=True):
        with Image.open(path) as img:
            small = img.convert("L").resize((64, 48), Image.Resampling.BOX)
        for k, sigma in enumerate((0.0, 0.7, 1.4)):
            target = out / label / f"{path.stem}-{k}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            (small.filter(ImageFilter.GaussianBlur(sigma)) if sigma else small).save(target)
            rows.append({"path": str(target), "label": label, "patient": path.stem})
    return Manifest.from_records(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Phantom data, the judge, the LoRA and two generated sets (base model and LoRA)."""
    from fulora.audit.extractors import ClassifierExtractor
    from fulora.classify.train import ClassifyConfig, train_classifier
    from fulora.lora.train import LoraTrainConfig, train_lora

    root = tmp_path_factory.mktemp("learning")
    source = PhantomConfig(per_class=20, domain="source", seed=0, grid=False)
    generate_phantom(root / "lora-data", source)
    judge_data = generate_phantom(
        root / "judge-data", PhantomConfig(per_class=60, domain="source", seed=1, grid=False)
    )
    held_out = generate_phantom(
        root / "held-out", PhantomConfig(per_class=20, domain="source", seed=2, grid=False)
    )
    judge_cfg = ClassifyConfig(
        arch="tiny_cnn",
        pretrained=False,
        image_size=64,
        epochs=10,
        batch_size=32,
        optimizer="adamw",
        lr=0.002,
        device="cpu",
        seed=0,
    )
    judge_set = _judge_training_set(judge_data, root / "judge-set")
    train_classifier([judge_set], root / "judge", judge_cfg, progress=False)
    lora = root / "lora"
    train_lora(
        read_any(root / "lora-data"),
        lora,
        LoraTrainConfig(base=PHANTOM_SD, save_dtype="fp32", **DEMO_LORA),
        progress=False,
    )
    base = generate(root / "gen-base", GenerateConfig(base=PHANTOM_SD, **GEN), progress=False)
    tuned = generate(
        root / "gen-lora", GenerateConfig(base=PHANTOM_SD, lora=str(lora), **GEN), progress=False
    )
    assert base["images"] == tuned["images"] == 20 * len(PLANES)
    return {
        "root": root,
        "lora": lora,
        "judge": ClassifierExtractor(root / "judge", device="cpu"),
        "held_out": held_out,
    }


def _accuracy(world, folder) -> dict[str, float]:
    manifest = Manifest.read(folder / "manifest.csv")
    _, proba = world["judge"].run(manifest)
    predicted = np.array(world["judge"].classes)[proba.argmax(1)]
    labels = np.array(manifest.labels)
    return {p: float((predicted[labels == p] == p).mean()) for p in PLANES}


def test_the_judge_knows_the_planes(world):
    assert np.mean(list(_accuracy(world, world["root"] / "held-out").values())) > 0.9


def test_lora_images_show_their_prompts_plane(world):
    base = _accuracy(world, world["root"] / "gen-base")
    tuned = _accuracy(world, world["root"] / "gen-lora")
    print(f"judge accuracy per plane: base {base}, LoRA {tuned}")
    assert np.mean(list(base.values())) <= MAX_BASE_ACCURACY
    assert np.mean(list(tuned.values())) >= MIN_LORA_ACCURACY


def _grey_pixels(manifest: Manifest, size=(64, 48)) -> np.ndarray:
    """Grey levels at the model's own 64x48 as KID features (no network's features).

    Not the judge's features: a classifier's features measure how plane-like an image is, and
    the judge put the LoRA's sharper planes further from real images than the base model's
    vague ones (measured on a half-trained model: KID 2.05 vs 0.65) while the pixels came
    closer. Measured on the shipped model (BENCHMARKS.md): KID base 0.0038, LoRA 0.0022.
    """
    rows = []
    for path in manifest.paths:
        with Image.open(path) as img:
            small = img.convert("L").resize(size, Image.Resampling.BOX)
        rows.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
    return np.stack(rows)


def test_kid_to_held_out_real_images_falls_after_fine_tuning(world):
    from fulora.audit.fidelity import fidelity_metrics

    reference = _grey_pixels(world["held_out"])

    def kid(folder):
        feats = _grey_pixels(Manifest.read(folder / "manifest.csv"))
        return fidelity_metrics(feats, reference, kid_subsets=50, seed=0)["kid_mean"]

    base, tuned = kid(world["root"] / "gen-base"), kid(world["root"] / "gen-lora")
    print(f"KID to held-out source images: base {base:.5f}, LoRA {tuned:.5f}")
    assert tuned < MAX_KID_RATIO * base


def _one(world, name: str, only=("brain:0", "brain:1"), **changes) -> list[np.ndarray]:
    """Regenerate ``only`` (in their full batch, so comparable bit for bit) with ``changes``."""
    cfg = GenerateConfig(**{"base": PHANTOM_SD, **GEN, **changes})
    out = world["root"] / name
    generate(out, cfg, only=list(only), progress=False)
    arrays = []
    for item in only:
        plane, index = item.split(":")
        path = image_path(out, plane, int(index), image_seed(cfg.seed, plane, int(index)))
        with Image.open(path) as img:
            arrays.append(np.asarray(img, dtype=np.int16))
    return arrays


def _pixels(world, folder: str, only=("brain:0", "brain:1")) -> list[np.ndarray]:
    out = []
    for item in only:
        plane, index = item.split(":")
        path = image_path(
            world["root"] / folder, plane, int(index), image_seed(GEN["seed"], plane, int(index))
        )
        with Image.open(path) as img:
            out.append(np.asarray(img, dtype=np.int16))
    return out


def test_lora_scale_zero_is_the_base_model(world):
    at_zero = _one(world, "scale-0", lora=str(world["lora"]), lora_scale=0.0)
    for a, b in zip(at_zero, _pixels(world, "gen-base"), strict=True):
        assert (a == b).all()


def test_lora_scale_is_applied_once(world, tmp_path):
    """Scale 0.5 must equal scale 1 of the same LoRA with its up matrices halved."""
    from safetensors.torch import load_file, save_file

    kohya = load_file(str(world["lora"] / f"{DEMO_LORA['output_name']}.safetensors"))
    halved = tmp_path / "halved.safetensors"
    save_file({k: v * 0.5 if "lora_up" in k else v for k, v in kohya.items()}, str(halved))
    at_half = _one(world, "scale-half", lora=str(world["lora"]), lora_scale=0.5)
    up_halved = _one(world, "up-halved", lora=str(halved), lora_scale=1.0)
    full = _pixels(world, "gen-lora")
    for a, b, f in zip(at_half, up_halved, full, strict=True):
        assert np.abs(a - b).max() <= 1 and np.abs(a - f).mean() > 1.0


def test_text_encoder_lora_and_clip_skip_each_change_the_images(world, tmp_path):
    from safetensors.torch import load_file, save_file

    kohya = load_file(str(world["lora"] / f"{DEMO_LORA['output_name']}.safetensors"))
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in kohya.items() if not k.startswith("lora_te")}, str(unet_only))
    full = _pixels(world, "gen-lora")
    without_te = _one(world, "no-te", lora=str(unet_only))
    other_skip = _one(world, "skip-1", lora=str(world["lora"]), clip_skip=1)
    te_change = [float(np.abs(f - a).mean()) for f, a in zip(full, without_te, strict=True)]
    skip_change = [float(np.abs(f - b).mean()) for f, b in zip(full, other_skip, strict=True)]
    print(f"mean grey-level change: without TE LoRA {te_change}, clip skip 1 {skip_change}")
    # Same settings reproduce an image bit for bit, so any real change is far above 0.
    assert min(te_change) > MIN_GREY_CHANGE and min(skip_change) > MIN_GREY_CHANGE


def test_kohya_export_reimported_generates_the_same_images(world):
    from_kohya = _pixels(world, "gen-lora")  # generate picks the run's kohya file
    from_diffusers = _one(
        world, "diffusers-file", lora=str(world["lora"] / "pytorch_lora_weights.safetensors")
    )
    for a, b in zip(from_kohya, from_diffusers, strict=True):
        assert np.abs(a - b).max() <= 1
