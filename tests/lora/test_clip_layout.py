"""Model folders that transformers 4 and 5 both read (``fulora.lora.clip_layout``).

transformers 5's ``save_pretrained`` writes CLIP's keys without ``text_model.``; transformers
4.57 loads such a folder as a random text encoder and only warns (checked in a scratch venv
with transformers 5.25, session 35). Here a folder is made flat by hand, as 5 writes it.
"""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from fulora.errors import ConfigError
from fulora.lora.base import load_pipeline
from fulora.lora.clip_layout import (
    CLIP_LEVEL,
    check_readable_layout,
    installed_clip_is_flat,
    write_kohya_layout,
)


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())  # noqa: SIM118


def test_fuloras_model_folders_carry_the_text_model_level(tiny_model):
    """``fulora lora tiny-model`` (and ``foundation build``, by the same call) write the keys
    every transformers reads, whichever transformers wrote them."""
    keys = _keys(tiny_model)
    assert keys and all(key.startswith(CLIP_LEVEL) for key in keys)


def test_a_flat_text_encoder_is_refused_by_transformers_4_and_rewritten_for_both(
    tiny_model, tmp_path
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    original = load_file(str(weights))
    save_file({k.removeprefix(CLIP_LEVEL): v for k, v in original.items()}, str(weights))
    if installed_clip_is_flat():  # transformers 5 reads it as it is
        check_readable_layout(folder)
    else:
        hint = r"by transformers 5 .* random weights.*\.write_kohya_layout\('\S+text_encoder'\)"
        with pytest.raises(ConfigError, match=hint):
            load_pipeline(folder)
    write_kohya_layout(folder / "text_encoder")
    assert load_file(str(weights)).keys() == original.keys()
    check_readable_layout(folder)
    model, info = CLIPTextModel.from_pretrained(
        folder / "text_encoder", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", dtype=torch.float32)
    for (name, value), (_, expected) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
