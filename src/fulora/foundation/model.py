"""The architecture of fulora's tiny foundation model: SD1.5's classes, scaled to 64x48 px.

Same diffusers/transformers classes and wiring as Stable Diffusion 1.5 (``AutoencoderKL``,
``UNet2DConditionModel`` with cross-attention, ``CLIPTextModel`` with a CLIP BPE tokenizer, a
DDPM-family scheduler with SD1.5's noise schedule), so every fulora stage and plain
``StableDiffusionPipeline`` use it unchanged. Sizes follow what 2 CPU cores can pretrain in
about an hour (``../shared/notes/tiny-foundation-model.md``): a VAE that downsamples by 4 (a
64x48 image is a 16x12 latent), and attention only on the 8x6 and 4x3 feature maps, where it is
cheap. About 10 M parameters, 21 MB in fp16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fulora.foundation.corpus import CAPTION_WORDS
from fulora.lora.tiny import (
    TINY_PROMPT_WORDS,
    pipeline_parts,
    sd15_scheduler,
    write_tiny_tokenizer,
)

TOKENIZER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(TINY_PROMPT_WORDS + CAPTION_WORDS))


def foundation_tokenizer(folder: str | Path):
    """The CLIP BPE tokenizer with a whole token for every plane-prompt and caption word."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder, TOKENIZER_WORDS)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def foundation_components(seed: int, tokenizer_dir: str | Path) -> dict:
    """Untrained components (``StableDiffusionPipeline(**components)``), seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = foundation_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=64,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=(12, 16),  # (height, width) of the latent: diffusers' default size 64x48
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 192),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return pipeline_parts(unet, vae, text_encoder, tokenizer, sd15_scheduler())
