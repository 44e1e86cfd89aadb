"""CLIP's text encoder in transformers 4's layout and in transformers 5's flat one.

transformers 5 flattened ``CLIPTextModel``: the ``embeddings``, ``encoder`` and
``final_layer_norm`` that its ``text_model`` held became its own modules, so its module paths
and state-dict keys lost ``text_model.``. kohya's and AUTOMATIC1111's LoRA names, the LoRA files
and model folders of transformers 4, and SD1.5's checkpoints keep that level. fulora writes it
whichever transformers runs, and reads either: a folder written by transformers 5's
``save_pretrained`` would load into transformers 4's model as random weights, with a warning
only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fulora.errors import ConfigError
from fulora.io import atomic_path

_WRAPPER = "text_model"
CLIP_LEVEL = _WRAPPER + "."


def kohya_layout(part: Literal["unet", "text_encoder"], module_name: str) -> str:
    """A module's path (or a tensor's key) as kohya, A1111 and transformers 4 name it."""
    if part == "text_encoder" and not module_name.startswith(CLIP_LEVEL):
        return CLIP_LEVEL + module_name
    return module_name


def is_flat(text_encoder: nn.Module) -> bool:
    """Whether ``text_encoder`` is transformers 5's flat CLIP (no ``text_model`` inside)."""
    model = text_encoder.module if hasattr(text_encoder, "module") else text_encoder
    return not hasattr(model, _WRAPPER)


def model_path(text_encoder: nn.Module, module_name: str) -> str:
    """A text-encoder path in kohya's layout as ``text_encoder`` names it (the inverse)."""
    return module_name.removeprefix(CLIP_LEVEL) if is_flat(text_encoder) else module_name


def clip_transformer(text_encoder: nn.Module) -> nn.Module:
    """The module holding CLIP's ``embeddings``, ``encoder`` and ``final_layer_norm``."""
    model = text_encoder.module if hasattr(text_encoder, "module") else text_encoder
    return model if is_flat(model) else getattr(model, _WRAPPER)


@functools.cache
def installed_clip_is_flat() -> bool:
    """Whether this transformers' ``CLIPTextModel`` is flat (built on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1
    )
    with torch.device("meta"):
        return is_flat(CLIPTextModel(config))


def _weight_files(text_encoder_dir: Path) -> list[Path]:
    return sorted(text_encoder_dir.glob("*.safetensors"))


def write_kohya_layout(text_encoder_dir: str | Path) -> None:
    """Rewrite a saved text encoder's keys under ``text_model.``, which both transformers read.

    For a folder written by ``save_pretrained``: transformers 5 writes the flat keys.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in _weight_files(Path(text_encoder_dir)):
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            keys = list(handle.keys())  # noqa: SIM118
            if all(key.startswith(CLIP_LEVEL) for key in keys):
                continue
            tensors = {kohya_layout("text_encoder", k): handle.get_tensor(k) for k in keys}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)


def check_readable_layout(model_dir: str | Path) -> None:
    """Refuse a model folder whose text encoder this transformers would load as random weights.

    Raises:
        ConfigError: If its keys are transformers 5's flat ones and this transformers is 4.
    """
    from safetensors import safe_open

    files = _weight_files(Path(model_dir) / "text_encoder")
    if not files or installed_clip_is_flat():
        return
    with safe_open(str(files[0]), framework="pt") as handle:
        if any(key.startswith(CLIP_LEVEL) for key in handle.keys()):  # noqa: SIM118
            return
    import transformers

    raise ConfigError(
        f"the text encoder in {files[0].parent} was saved by transformers 5 (its keys lack "
        f"{CLIP_LEVEL}), and transformers {transformers.__version__} would load it as random "
        "weights: install transformers 5 (pip install 'transformers>=5.6' 'diffusers>=0.42'), "
        "or rewrite its keys once into the layout both read, in Python: "
        f"fulora.lora.clip_layout.write_kohya_layout('{files[0].parent}')"
    )
