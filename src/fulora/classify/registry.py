"""Classifier architectures: a registry and a ``create_model`` factory.

The paper's five backbones come from torchvision (DenseNet169, MobileNetV2, EfficientNet-B0,
ResNet18, ViT-B/16); any timm model is available by name (``timm:convnext_tiny``, or just the
name when torchvision has no such model); ``tiny_cnn`` is a small network for tests and the CPU
demo. ImageNet weights are taken from the torch/timm cache, downloaded when the network allows,
or loaded from ``weights=PATH``; without any, ``create_model`` fails with a message naming what
to pass. It never falls back to random weights silently: the returned :class:`ModelInfo` says
which weights were used, and every run records it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

from fulora.errors import ConfigError
from fulora.io import file_hash

logger = logging.getLogger("fulora")


@dataclass(frozen=True)
class ModelInfo:
    """What ``create_model`` built: the canonical name and the weights it loaded."""

    arch: str
    weights: str  # "none (random init)", "imagenet: <id>", or "file: <path> sha256 <hex>"
    input_size: int | None = None  # a fixed input size the model needs (ViT), if any


_REGISTRY: dict[str, Callable[..., tuple[nn.Module, str | None]]] = {}
IMAGENET_WEIGHTS = Literal["DEFAULT", "IMAGENET1K_V1"]
_ALIASES: dict[str, str] = {}


def register_model(name: str, *aliases: str):
    """Register a builder ``fn(num_classes, imagenet) -> (module, weights_id | None)``.

    ``imagenet`` is None (random initialisation) or a torchvision weights name (``DEFAULT``,
    ``IMAGENET1K_V1``); a builder that has no such weights raises :class:`ConfigError`.
    """

    def wrap(fn):
        _REGISTRY[name] = fn
        for alias in (name, *aliases):
            _ALIASES[_key(alias)] = name
        return fn

    return wrap


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def list_models() -> list[str]:
    """Registered architecture names (any timm model is also accepted)."""
    return sorted(_REGISTRY)


def _torchvision(name: str, head: Callable[[nn.Module, int], None]):
    def build(num_classes: int, imagenet: str | None) -> tuple[nn.Module, str | None]:
        from torchvision.models import get_model, get_model_weights

        weights = getattr(get_model_weights(name), imagenet) if imagenet else None
        if weights is not None:
            _ensure_available(weights.url, name)
        model = get_model(name, weights=weights)
        head(model, num_classes)
        return model, (f"imagenet: torchvision {weights}" if weights is not None else None)

    return build


def _replace_linear(path: str):
    def head(model: nn.Module, num_classes: int) -> None:
        parent = model
        *parents, last = path.split(".")
        for part in parents:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        old = parent[int(last)] if last.isdigit() else getattr(parent, last)
        new = nn.Linear(old.in_features, num_classes)
        if last.isdigit():
            parent[int(last)] = new
        else:
            setattr(parent, last, new)

    return head


register_model("densenet169", "DenseNet169", "densenet-169")(
    _torchvision("densenet169", _replace_linear("classifier"))
)
register_model("mobilenet_v2", "MobileNet v2", "mobilenetv2")(
    _torchvision("mobilenet_v2", _replace_linear("classifier.1"))
)
register_model("efficientnet_b0", "EfficientNet b0", "efficientnet-b0")(
    _torchvision("efficientnet_b0", _replace_linear("classifier.1"))
)
register_model("resnet18", "ResNet18", "resnet-18")(_torchvision("resnet18", _replace_linear("fc")))
register_model("vit_b_16", "ViT b16", "vit-b/16", "vitb16")(
    _torchvision("vit_b_16", _replace_linear("heads.head"))
)

#: The paper's five backbones, in the paper's table order.
PAPER_ARCHS: tuple[str, ...] = (
    "densenet169",
    "mobilenet_v2",
    "efficientnet_b0",
    "resnet18",
    "vit_b_16",
)


class TinyCNN(nn.Module):
    """A small CNN (~25k parameters) for tests and the CPU demo; trains in seconds."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding (N, 4 * width)."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.classifier(self.forward_features(x))


@register_model("tiny_cnn", "tiny")
def _tiny(num_classes: int, imagenet: str | None) -> tuple[nn.Module, str | None]:
    if imagenet:
        raise ConfigError(
            "tiny_cnn has no ImageNet weights: set pretrained: false (CLI: --pretrained false), "
            "or give a state dict to start from (weights, --weights)"
        )
    return TinyCNN(num_classes), None


def _network_reachable(url: str, timeout: float = 3.0) -> bool:
    if os.environ.get("FULORA_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        return False
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _ensure_available(url: str, arch: str) -> None:
    """Fail fast, with instructions, when weights are neither cached nor downloadable."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file() or _network_reachable(url):
        return
    raise ConfigError(
        f"ImageNet weights for {arch} are not in the torch cache ({cached}) and "
        f"{urlparse(url).hostname} cannot be reached. Copy the file there, pass "
        f"--weights PATH (a state dict), or train from scratch with --pretrained false"
    )


def _timm(name: str, num_classes: int, imagenet: str | None) -> tuple[nn.Module, str | None]:
    import timm

    if imagenet not in (None, "DEFAULT"):
        raise ConfigError(
            f"imagenet_weights {imagenet!r} names torchvision weights; timm model {name!r} has "
            "its own: use imagenet_weights: DEFAULT"
        )
    pretrained = imagenet is not None

    if not timm.list_models(name) and not timm.is_model(name):
        raise ConfigError(
            f"unknown architecture {name!r}: not one of {', '.join(list_models())} and not a "
            "timm model (see timm.list_models())"
        )
    if pretrained:
        if not _network_reachable("https://huggingface.co"):
            try:
                model = timm.create_model(name, pretrained=True, num_classes=num_classes)
            except Exception as err:  # timm raises many kinds when offline
                raise ConfigError(
                    f"ImageNet weights for timm model {name!r} are not cached and the hub "
                    "cannot be reached; pass --weights PATH or --pretrained false"
                ) from err
            return model, f"imagenet: timm {name} (cache)"
        return timm.create_model(name, pretrained=True, num_classes=num_classes), (
            f"imagenet: timm {name}"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes), None


def resolve_arch(name: str) -> str:
    """Canonical name of an architecture (``timm:<name>`` for timm models)."""
    if name.startswith("timm:"):
        return name
    canonical = _ALIASES.get(_key(name))
    return canonical if canonical is not None else f"timm:{name}"


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    imagenet: IMAGENET_WEIGHTS = "DEFAULT",
    log: bool = True,
) -> tuple[nn.Module, ModelInfo]:
    """Build a classifier.

    Args:
        name: A registered name or alias (``resnet18``, ``"MobileNet v2"``), ``timm:<name>``, or
            any timm model name.
        num_classes: Output classes.
        pretrained: Start from ImageNet weights (cache or download). Ignored with ``weights``.
        weights: A state dict file (``.pt``/``.pth``/``.safetensors``) to load instead; a
            classifier head of another size is left at its fresh initialisation.
        imagenet: Which torchvision ImageNet weights: ``DEFAULT`` (torchvision's best, e.g.
            ``IMAGENET1K_V2`` for MobileNet v2) or ``IMAGENET1K_V1`` (what the FU-LoRA
            notebook loads for all five backbones; every one of them has it).
        log: Log which weights it starts from (off when the caller loads its own next).

    Returns:
        The model and a :class:`ModelInfo` recording which weights were loaded.

    Raises:
        ConfigError: For an unknown architecture, or weights that cannot be had.
    """
    arch = resolve_arch(name)
    wanted = imagenet if pretrained and weights is None else None
    if arch.startswith("timm:"):
        model, weights_id = _timm(arch.removeprefix("timm:"), num_classes, wanted)
    else:
        model, weights_id = _REGISTRY[arch](num_classes, wanted)
    if weights is not None:
        weights_id = _load_weights_file(model, Path(weights))
    input_size = 224 if arch == "vit_b_16" else None
    info = ModelInfo(arch=arch, weights=weights_id or "none (random init)", input_size=input_size)
    if log:
        logger.info("model %s, %s", arch, info.weights)
    return model, info


def check_input_size(info: ModelInfo, image_size: int) -> None:
    """Refuse an image size the built model cannot take (vit_b_16: 224 px only)."""
    if info.input_size is not None and image_size != info.input_size:
        raise ConfigError(f"{info.arch} needs image_size {info.input_size}, got {image_size}")


def _load_weights_file(model: nn.Module, path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read weights file {path}: {err}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a fulora checkpoint
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise ConfigError(f"weights file {path} has no tensors matching this architecture")
    model.load_state_dict(compatible, strict=False)
    skipped = len(own) - len(compatible)
    if skipped:
        logger.info(
            "loaded %d tensors from %s; %d left as initialised (e.g. the head)",
            len(compatible),
            path,
            skipped,
        )
    return f"file: {path} sha256 {file_hash(path)[:16]}"
