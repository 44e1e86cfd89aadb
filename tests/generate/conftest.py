import pytest


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
