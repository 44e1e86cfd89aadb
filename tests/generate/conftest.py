import pytest

from fulora.lora.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD-architecture model saved with save_pretrained, loadable from its path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def lora_images(tmp_path_factory):
    """Phantom plane folders (with caption files), a handful of images per plane."""
    from fulora.data.phantom import PhantomConfig, generate_phantom

    root = tmp_path_factory.mktemp("lora-data")
    generate_phantom(root, PhantomConfig(per_class=3, planes=["brain", "femur"], grid=False))
    return root


@pytest.fixture(scope="session")
def trained_lora(tiny_model, lora_images, tmp_path_factory):
    """A LoRA run folder from the LoRA stage (tiny model, a few steps at a high rate)."""
    from fulora.data.readers import read_any
    from fulora.lora.train import LoraTrainConfig, train_lora

    out = tmp_path_factory.mktemp("lora-run")
    cfg = LoraTrainConfig(
        base=str(tiny_model),
        rank=4,
        alpha=4,
        resolution=64,
        bucket_step=16,
        repeats=2,
        max_steps=12,
        optimizer="adamw",
        unet_lr=2e-2,
        text_encoder_lr=2e-2,
        seed=0,
        output_name="phantom_lora",
    )
    train_lora(read_any(lora_images), out, cfg, progress=False)
    return out
