"""Classifier-free guidance between a prompt and a negative prompt of different lengths.

AUTOMATIC1111 encodes a prompt over 75 tokens, or with ``BREAK``, in chunks of 77 tokens
(``fulora.generate.prompts.a1111_chunks``). When the prompt and the negative prompt have
different chunk counts, A1111 runs the UNet on each on its own (its default: the "Pad
prompt/negative prompt" setting off). Diffusers' pipeline runs both in one batch and needs them
the same shape, so fulora pads the shorter one and masks the padding out of the UNet's
cross-attention: each then attends to its own tokens only, as alone (the masked keys' weights are
exactly 0; tested against separate passes in ``tests/generate/test_guidance.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def padded_sides(
    positive: torch.Tensor, negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The two sides' embeddings at one length, and which tokens each may attend to.

    Args:
        positive: The prompt's embeddings (1, tokens, channels).
        negative: The negative prompt's embeddings (1, tokens, channels).

    Returns:
        ``(positive, negative, keep)``: the shorter side padded with zeros, and ``keep`` (2,
        tokens), True on real tokens, rows in diffusers' batch order (negative, then
        positive); None when the lengths are already equal.
    """
    length = max(positive.shape[1], negative.shape[1])
    if positive.shape[1] == negative.shape[1]:
        return positive, negative, None
    keep = torch.zeros(2, length, dtype=torch.bool, device=positive.device)
    keep[0, : negative.shape[1]] = True
    keep[1, : positive.shape[1]] = True
    return _padded(positive, length), _padded(negative, length), keep


def _padded(hidden: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[1]))


@contextmanager
def cross_attention_mask(unet: torch.nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Every UNet call inside the block attends only to the ``keep`` tokens of its text.

    Diffusers' pipelines call the UNet without ``encoder_attention_mask``; a forward pre-hook
    adds it, and is removed on leaving, an error included.

    Args:
        unet: The pipeline's UNet (compiled or not).
        keep: (batch, tokens), True where a row's text token counts; None changes nothing.
    """
    if keep is None:
        yield
        return

    def add_mask(module, args, kwargs):
        return args, {**kwargs, "encoder_attention_mask": keep}

    handle = unet.register_forward_pre_hook(add_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
