"""Which layers get a LoRA: kohya-ss's standard set (the paper's), or attention only.

kohya-ss's standard LoRA (``networks/lora.py``, ``"LoRA_type": "Standard"`` in the FU-LoRA
README's config) wraps every ``Linear`` and every 1x1 ``Conv2d`` inside the UNet's
``Transformer2DModel`` blocks (self- and cross-attention q, k, v, out; the feed-forward
``ff.net.0.proj`` and ``ff.net.2``; ``proj_in`` and ``proj_out``) and every ``Linear`` inside the
text encoder's ``CLIPAttention`` and ``CLIPMLP`` blocks (q/k/v/out_proj, fc1, fc2). On SD1.5
that is 192 UNet and 72 text-encoder modules. ``attention`` keeps only the attention
projections (128 + 48 modules on SD1.5), the set diffusers' LoRA example scripts train.

The names returned are full module paths, given to peft as ``target_modules`` so that peft wraps
exactly these layers and nothing that merely shares a suffix.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from fulora.lora.clip_layout import kohya_layout
from fulora.lora.config import TargetPreset

TARGET_PRESETS: tuple[str, ...] = ("kohya", "attention")

# The block classes kohya's LoRANetwork searches (its UNET_TARGET_REPLACE_MODULE and
# TEXT_ENCODER_TARGET_REPLACE_MODULE); transformers names CLIP's attention class by backend.
_BLOCKS = {
    "unet": ("Transformer2DModel",),
    "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"),
}
_ATTENTION = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}


def _wrappable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def lora_target_modules(
    model: nn.Module, part: Literal["unet", "text_encoder"], preset: TargetPreset = "kohya"
) -> list[str]:
    """Full names of the modules of ``model`` that a LoRA of ``preset`` wraps.

    Args:
        model: A diffusers ``UNet2DConditionModel`` or a transformers ``CLIPTextModel``.
        part: ``unet`` or ``text_encoder``.
        preset: ``kohya`` (kohya-ss's standard LoRA) or ``attention`` (attention projections).

    Returns:
        Module names in model order, e.g. ``down_blocks.0.attentions.0.proj_in``.

    Raises:
        ValueError: For an unknown part or preset, or a model without such blocks.
    """
    if part not in _BLOCKS or preset not in TARGET_PRESETS:
        raise ValueError(f"unknown LoRA part {part!r} or target preset {preset!r}")
    names: dict[str, None] = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ not in _BLOCKS[part]:
            continue
        for child_name, child in block.named_modules():
            if not child_name or not _wrappable(child):
                continue
            if preset == "attention" and not child_name.endswith(_ATTENTION[part]):
                continue
            names[f"{block_name}.{child_name}" if block_name else child_name] = None
    if not names:
        raise ValueError(
            f"the {part} has no {' or '.join(_BLOCKS[part])} blocks: not a Stable Diffusion 1.x "
            f"{part}"
        )
    return list(names)


def kohya_module_name(part: Literal["unet", "text_encoder"], module_name: str) -> str:
    """Kohya's name of a wrapped module: ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{KOHYA_PREFIX[part]}_{kohya_layout(part, module_name).replace('.', '_')}"
