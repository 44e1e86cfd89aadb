"""Text conditioning with kohya-ss/AUTOMATIC1111 clip skip, for prompts and negative prompts.

Clip skip ``n`` (kohya's ``--clip_skip``, AUTOMATIC1111's "Clip skip") takes CLIP's hidden state
``n`` layers from the end and applies the final layer norm; 1 is the last layer as is. Both
kohya's sampler and AUTOMATIC1111 encode the negative (unconditional) prompt the same way as the
positive one. diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=...)`` applies the
skip to the positive prompt only, which would mix two embedding spaces under classifier-free
guidance, so fulora encodes both here and hands the pipeline the embeddings.

A generation prompt's emphasis (AUTOMATIC1111's ``(word:1.3)``) arrives as a weight per token
(``fulora.generate.prompts``) and is applied to the embeddings as A1111 applies it
(:func:`emphasise_together`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from fulora.errors import ConfigError
from fulora.lora.clip_layout import clip_transformer


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
    return clip_transformer(text_encoder).final_layer_norm(out.hidden_states[-clip_skip])


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


def emphasise_together(
    hidden: torch.Tensor, weights: torch.Tensor, normalise: bool = True
) -> torch.Tensor:
    """AUTOMATIC1111's emphasis of texts that A1111 encodes in one batch.

    The embeddings times each token's weight, then (``normalise``, A1111's default
    "Original") times (mean before / mean after), the means taken over the whole batch as
    A1111's ``EmphasisOriginal`` takes them; without, A1111's "No norm". In fp32, as A1111
    computes it with its fp32 weights, returned in ``hidden``'s dtype. Weights all 1 leave the
    embeddings as they are (A1111's result is the same numbers). Checked against A1111's
    ``sd_hijack_clip`` and ``sd_emphasis`` in ``tests/test_parity.py``.

    Args:
        hidden: Text embeddings (texts, tokens, channels).
        weights: Each token's weight (texts, tokens).
        normalise: Rescale to the unweighted embeddings' mean.
    """
    weights = weights.to(hidden.device, torch.float32)
    if bool((weights == 1).all()):
        return hidden
    plain = hidden.float()
    weighted = plain * weights[..., None]
    if normalise:
        weighted = weighted * (plain.mean() / weighted.mean())
    return weighted.to(hidden.dtype)


def chunked_embeddings(
    text_encoder,
    batches: list[list[list]],
    clip_skip: int,
    device: torch.device | str,
    normalise: bool = True,
    vectors: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Embeddings of texts given in AUTOMATIC1111's 77-token chunks, as A1111 encodes them.

    A1111's ``FrozenCLIPEmbedderWithCustomWords.forward`` on each batch of texts: every chunk
    is encoded on its own, the emphasis of the texts' chunks at one position is applied
    together (:func:`emphasise_together`), and a text's chunks follow one another. Every chunk
    of every batch goes through the text encoder in one call. A chunk's textual-inversion
    embeddings replace its token embeddings where they stand (A1111's
    ``EmbeddingsWithFixes``), before CLIP adds the positions.

    Args:
        text_encoder: The pipeline's CLIP text model.
        batches: Texts that A1111 encodes together (a prompt's texts step by step), each as
            its chunks ``(ids, weights[, fixes])`` (``fulora.generate.prompts.a1111_chunks``);
            the texts of a batch have as many chunks (A1111 adds empty ones).
        clip_skip: kohya/A1111 clip skip (1 = the last layer).
        device: Where the text encoder runs.
        normalise: The emphasis restores the mean (A1111's "Original"; False: "No norm").
        vectors: Each embedding's vectors by name (needed where a chunk has fixes).

    Returns:
        One tensor (texts, 77 x chunks, hidden) per batch.
    """
    for texts in batches:
        if any(len(chunks) != len(texts[0]) for chunks in texts):
            raise ValueError("the texts of a batch must have as many chunks (add empty ones)")
    flat = [chunk for texts in batches for chunks in texts for chunk in chunks]
    ids = torch.tensor([chunk[0] for chunk in flat], device=device)
    weights = torch.tensor([chunk[1] for chunk in flat], dtype=torch.float32)
    fixes = [(row, at, name) for row, chunk in enumerate(flat) for at, name in _fixes(chunk)]
    with torch.no_grad(), _inserted(text_encoder, fixes, vectors or {}):
        hidden = encode_prompt(text_encoder, ids, clip_skip)
    sizes = [len(texts) * len(texts[0]) for texts in batches]
    embedded = []
    for texts, rows, row_weights in zip(
        batches, hidden.split(sizes), weights.split(sizes), strict=True
    ):
        count = len(texts[0])
        rows = rows.unflatten(0, (len(texts), count))  # (texts, chunks, 77, hidden)
        row_weights = row_weights.unflatten(0, (len(texts), count))
        chunks = [
            emphasise_together(rows[:, i], row_weights[:, i], normalise) for i in range(count)
        ]
        embedded.append(torch.cat(chunks, dim=1))
    return embedded


def _fixes(chunk) -> tuple[tuple[int, str], ...]:
    return chunk[2] if len(chunk) > 2 else ()


@contextmanager
def _inserted(text_encoder, fixes: list[tuple[int, int, str]], vectors: dict[str, torch.Tensor]):
    """The token embeddings with each embedding's vectors at (row, position), as A1111's.

    A1111 casts the vectors to the model's dtype and cuts those that would run past the
    chunk's 77 tokens.
    """
    if not fixes:
        yield
        return
    missing = sorted({name for _, _, name in fixes} - set(vectors))
    if missing:
        raise ValueError(f"the chunks hold the embeddings {missing} and no vectors are given")
    layer = clip_transformer(text_encoder).embeddings.token_embedding

    def insert(module, args, output):
        output = output.clone()
        for row, at, name in fixes:
            vector = vectors[name].to(output.device, output.dtype)
            count = min(output.shape[1] - at, len(vector))
            output[row, at : at + count] = vector[:count]
        return output

    handle = layer.register_forward_hook(insert)
    try:
        yield
    finally:
        handle.remove()
