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
