"""Text conditioning with kohya-ss/AUTOMATIC1111 clip skip, for prompts and negative prompts.

Clip skip ``n`` (kohya's ``--clip_skip``, AUTOMATIC1111's "Clip skip") takes CLIP's hidden state
``n`` layers from the end and applies the final layer norm; 1 is the last layer as is. Both
kohya's sampler and AUTOMATIC1111 encode the negative (unconditional) prompt the same way as the
positive one. diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=...)`` applies the
skip to the positive prompt only, which would mix two embedding spaces under classifier-free
guidance, so fulora encodes both here and hands the pipeline the embeddings.

A generation prompt's emphasis (AUTOMATIC1111's ``(word:1.3)``) arrives as a weight per token
(``fulora.generate.prompts``) and is applied to the embeddings as A1111 applies it
(:func:`emphasise`).
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


def emphasise(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's default ("Original") emphasis: weight each token, keep the prompt's mean.

    Per prompt (row): the embeddings times each token's weight, then times (mean before / mean
    after), in fp32 as A1111 computes it with its fp32 weights, returned in ``hidden``'s dtype.
    A row of weights 1 is left as it is (A1111's result is the same numbers). Checked against
    A1111's ``sd_hijack_clip`` and ``sd_emphasis`` in ``tests/test_parity.py``.

    Args:
        hidden: Text embeddings (prompts, tokens, channels).
        weights: Each token's weight (prompts, tokens).
    """
    rows = []
    for row, row_weights in zip(hidden, weights.to(hidden.device, torch.float32), strict=True):
        if bool((row_weights == 1).all()):
            rows.append(row)
            continue
        plain = row.float()
        weighted = plain * row_weights[:, None]
        rows.append((weighted * (plain.mean() / weighted.mean())).to(hidden.dtype))
    return torch.stack(rows)


def weighted_embeddings(
    text_encoder,
    token_rows: list[list[int]],
    weight_rows: list[list[float]],
    clip_skip: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Embeddings of prompts given as token ids and per-token emphasis weights.

    Args:
        text_encoder: The pipeline's CLIP text model.
        token_rows: Each prompt's token ids, padded to the tokenizer's length.
        weight_rows: Each prompt's weight per token (1 for plain text).
        clip_skip: kohya/A1111 clip skip (1 = the last layer).
        device: Where the text encoder runs.

    Returns:
        A tensor (prompts, tokens, hidden).
    """
    ids = torch.tensor(token_rows, device=device)
    with torch.no_grad():
        hidden = encode_prompt(text_encoder, ids, clip_skip)
    return emphasise(hidden, torch.tensor(weight_rows, dtype=torch.float32))


def chunked_embeddings(
    text_encoder,
    prompts: list[list[tuple[list[int], list[float]]]],
    clip_skip: int,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Embeddings of prompts given in AUTOMATIC1111's 77-token chunks, as A1111 encodes them.

    Every chunk is encoded on its own (in one batch) and emphasised on its own, and a prompt's
    chunks follow one another: A1111's ``FrozenCLIPEmbedderWithCustomWords.forward``.

    Args:
        text_encoder: The pipeline's CLIP text model.
        prompts: Each prompt's chunks, ``(ids, weights)`` each
            (``fulora.generate.prompts.a1111_chunks``).
        clip_skip: kohya/A1111 clip skip (1 = the last layer).
        device: Where the text encoder runs.

    Returns:
        One tensor (1, 77 x chunks, hidden) per prompt.
    """
    ids, weights = zip(*[chunk for chunks in prompts for chunk in chunks], strict=True)
    hidden = weighted_embeddings(text_encoder, list(ids), list(weights), clip_skip, device)
    sides = hidden.split([len(chunks) for chunks in prompts])
    return [side.reshape(1, -1, side.shape[-1]) for side in sides]
