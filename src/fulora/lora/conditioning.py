"""Text conditioning with kohya-ss/AUTOMATIC1111 clip skip, for prompts and negative prompts.

Clip skip ``n`` (kohya's ``--clip_skip``, AUTOMATIC1111's "Clip skip") takes CLIP's hidden state
``n`` layers from the end and applies the final layer norm; 1 is the last layer as is. Both
kohya's sampler and AUTOMATIC1111 encode the negative (unconditional) prompt the same way as the
positive one. diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=...)`` applies the
skip to the positive prompt only, which would mix two embedding spaces under classifier-free
guidance, so fulora encodes both here and hands the pipeline the embeddings.
"""

from __future__ import annotations

import torch

from fulora.errors import ConfigError


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77 for CLIP), as kohya and A1111 pad."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompt(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """CLIP embeddings with kohya's clip skip (2: the penultimate layer, then the final norm).

    Raises:
        ConfigError: If ``clip_skip`` is below 1 or deeper than the text encoder.
    """
    model = text_encoder.module if hasattr(text_encoder, "module") else text_encoder
    layers = model.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ConfigError(
            f"clip_skip must be between 1 and {layers} (CLIP's layers), got {clip_skip}"
        )
    if clip_skip == 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return model.text_model.final_layer_norm(out.hidden_states[-clip_skip])


def prompt_embeddings(
    tokenizer,
    text_encoder,
    prompt: str,
    negative_prompt: str | None,
    clip_skip: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positive, negative) embeddings of one prompt, both at the same clip skip.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        text_encoder: The pipeline's CLIP text model.
        prompt: The prompt.
        negative_prompt: The negative prompt ("" for the empty one), or None without
            classifier-free guidance.
        clip_skip: kohya/A1111 clip skip (1 = the last layer).
        device: Where the text encoder runs.

    Returns:
        Tensors of shape (1, 77, hidden); the negative is None when ``negative_prompt`` is.
    """
    texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
    with torch.no_grad():
        hidden = encode_prompt(text_encoder, token_ids(tokenizer, texts).to(device), clip_skip)
    positive = hidden[:1]
    return positive, (hidden[1:] if negative_prompt is not None else None)
