"""The CUDA-only paths, on a GPU: marker ``gpu`` (``pytest -m gpu``), skipped without CUDA.

On the CPU machine these paths never run: 8-bit AdamW and fp16 mixed precision in LoRA
training (the paper recipe), fp16 generation, and the classifiers' autocast types with
channels-last and the device-resident training set. Each test runs the path end to end with
the tiny in-process model and checks what a wrong setting would break; the speed of each is the
GPU suite's business (benchmarks/gpu_suite.py). Written before a GPU ran them (session 10):
the first lease that runs them confirms the tolerance below or says what it is.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fulora.classify.train import ClassifyConfig, train_classifier
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any
from fulora.generate.run import GenerateConfig, generate
from fulora.lora.train import LoraTrainConfig, train_lora

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_the_paper_lora_recipe_runs_as_the_paper_ran_it(tiny_model, lora_images, tmp_path):
    """8-bit AdamW (bitsandbytes), fp16 mixed precision, clip skip 2: what the record says is
    what ran (no silent fallback to torch's AdamW or to fp32), and the loss stays finite."""
    pytest.importorskip("bitsandbytes")
    cfg = LoraTrainConfig(
        base=str(tiny_model),
        rank=4,
        alpha=4,
        resolution=64,
        bucket_step=16,
        repeats=2,
        max_steps=8,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        seed=0,
    )
    assert (cfg.optimizer, cfg.mixed_precision, cfg.clip_skip) == ("adamw8bit", "fp16", 2)
    record = train_lora(read_any(lora_images), tmp_path / "lora", cfg, progress=False)
    assert record["optimizer"] == "AdamW8bit" and record["mixed_precision"] == "fp16"
    assert record["device"].startswith("cuda") and record["peak_gpu_memory_gb"] > 0
    loss = pd.read_csv(tmp_path / "lora" / "loss.csv")["loss"]
    assert len(loss) == 8 and np.isfinite(loss).all()


def _generate(out, tiny_model, lora, device):
    cfg = GenerateConfig(
        base=str(tiny_model),
        lora=str(lora),
        planes=["brain", "femur"],
        per_class=4,
        steps=3,
        width=80,
        height=48,
        batch_size=4,
        seed=7,
        device=device,
        contact_sheet=0,
    )
    record = generate(out, cfg, progress=False)
    pixels = {
        p.relative_to(out): np.asarray(Image.open(p), dtype=np.int16)
        for p in sorted(out.glob("*/*.png"))
    }
    return record, pixels


def test_fp16_generation_stays_close_to_fp32_on_the_cpu(tiny_model, trained_lora, tmp_path):
    """dtype auto is fp16 on CUDA: the same seeds give the CPU's fp32 images within a few grey
    levels (fp16 rounding through the UNet, the sampler and the VAE; no NaN, no shifted seeds)."""
    on_gpu, fast = _generate(tmp_path / "gpu", tiny_model, trained_lora, DEVICE)
    _, plain = _generate(tmp_path / "cpu", tiny_model, trained_lora, "cpu")
    assert fast.keys() == plain.keys() and len(fast) == 8
    for rel in fast:
        diff = np.abs(fast[rel] - plain[rel])
        assert diff.mean() < 2.0 and (diff > 8).mean() < 0.01, (rel, diff.mean(), diff.max())
    assert on_gpu["this_run_device"].startswith("cuda") and on_gpu["this_run_generated"] == 8


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom-gpu")
    return generate_phantom(root, PhantomConfig(per_class=12, domain="source", grid=False))


@pytest.mark.parametrize(
    "speed",
    [
        dict(amp=False, channels_last=False),  # the paper preset's fp32
        dict(amp=True, amp_dtype="fp16", channels_last=True),  # fulora's defaults on CUDA
        dict(amp=True, amp_dtype="bf16", channels_last=True),
        dict(amp=True, amp_dtype="fp16", channels_last=True, fused_optimizer=True),
        dict(amp=True, amp_dtype="fp16", channels_last=True, preload=True, augment="da"),
    ],
    ids=["fp32", "fp16-channels-last", "bf16-channels-last", "fp16-fused", "fp16-preload-da"],
)
def test_classifier_precisions_train_and_keep_fp32_weights(phantom_source, tmp_path, speed):
    """Each autocast type trains (finite losses) and saves fp32 weights: autocast computes in
    half precision but must never turn the weights themselves into halves."""
    if speed.get("amp_dtype") == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = ClassifyConfig(
        arch="tiny_cnn",
        pretrained=False,
        image_size=48,
        epochs=2,
        batch_size=16,
        lr=0.01,
        cache_dir=str(tmp_path / "cache"),
        device=DEVICE,
        **speed,
    )
    record = train_classifier([phantom_source], tmp_path / "run", cfg, progress=False)
    assert record["device"].startswith("cuda") and record["epochs_run"] == 2
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    weights = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
