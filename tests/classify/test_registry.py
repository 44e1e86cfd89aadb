import pytest
import torch

from fulora.classify import registry
from fulora.classify.registry import PAPER_ARCHS, create_model, resolve_arch
from fulora.errors import ConfigError


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_architectures_build_from_scratch(arch):
    model, info = create_model(arch, 5, pretrained=False)
    assert info.weights == "none (random init)" and info.arch == arch
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("MobileNet v2", "mobilenet_v2"),
        ("ViT b16", "vit_b_16"),
        ("DenseNet169", "densenet169"),
        ("EfficientNet b0", "efficientnet_b0"),
        ("ResNet18", "resnet18"),
        ("tiny", "tiny_cnn"),
        ("test_resnet", "timm:test_resnet"),
        ("timm:test_vit", "timm:test_vit"),
    ],
)
def test_aliases(alias, name):
    assert resolve_arch(alias) == name


def test_timm_model_by_name():
    model, info = create_model("test_resnet", 3, pretrained=False)
    assert info.arch == "timm:test_resnet"
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet_1000'"):
        create_model("resnet_1000", 5, pretrained=False)


def test_missing_imagenet_weights_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(registry, "_network_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", 5, pretrained=True)
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and "--pretrained false" in message
    assert "--weights PATH" in message


def test_weights_file_is_loaded_and_recorded(tmp_path):
    source, _ = create_model("resnet18", 10, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, info = create_model("resnet18", 5, weights=tmp_path / "w.pth")
    assert info.weights.startswith(f"file: {tmp_path / 'w.pth'} sha256 ")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5  # the head of another size is fresh
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("resnet18", 5, weights=tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        create_model("resnet18", 5, weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("arch", ["tiny_cnn", "tiny", "Tiny-CNN"])
def test_an_architecture_without_imagenet_weights_names_both_ways_to_start_it(arch):
    """The hint was YAML's spelling alone, given to a command-line user."""
    hint = r"has no ImageNet weights.*--pretrained false.*--weights"
    with pytest.raises(ConfigError, match=hint):
        create_model(arch, 3)
    create_model(arch, 3, pretrained=False)
