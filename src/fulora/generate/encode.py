"""A plane's prompt and negative prompt encoded step by step, as AUTOMATIC1111 encodes them.

The prompt's ``AND`` parts and the negative prompt are each scheduled over the sampling steps
(``fulora.generate.schedules``); each text is laid out in A1111's chunks
(``fulora.generate.prompts``) and encoded with the texts of its schedule, as A1111's
``get_learned_conditioning`` encodes them (``fulora.lora.conditioning.chunked_embeddings``).
The result is what ``fulora.generate.guidance.guided`` conditions the UNet on, call by call.
"""

from __future__ import annotations

import logging

import torch

from fulora.generate.guidance import Conditioning, Scheduled, stacked_parts
from fulora.generate.inversions import TextualInversions
from fulora.generate.prompts import a1111_chunks
from fulora.generate.schedules import PromptPart, read_prompt
from fulora.lora.conditioning import chunked_embeddings

logger = logging.getLogger("fulora")


def encode_prompts(
    pipe,
    prompt: str,
    negative: str | None,
    steps: int,
    clip_skip: int,
    device: torch.device | str,
    plane: str = "",
    emphasis: str = "original",
    pad: str = "off",
    empty: torch.Tensor | None = None,
    old_timelines: bool = False,
    inversions: TextualInversions | None = None,
    hires_steps: int | None = None,
) -> Conditioning:
    """A prompt and negative prompt, embedded step by step as A1111 embeds them.

    Each ``AND`` part of the prompt, and the negative prompt, is a batch of its texts, one per
    entry of its schedule (one text without editing or alternation), each text its chunks one
    after the other, a batch's shorter texts filled with empty chunks as A1111 fills them.

    Args:
        pipe: The pipeline (its tokenizer and text encoder).
        prompt: The prompt as written.
        negative: The negative prompt, or None without classifier-free guidance.
        steps: The steps A1111 schedules them over (``schedules.schedule_steps``).
        clip_skip: kohya/A1111 clip skip (1 = the last layer).
        device: Where the text encoder runs.
        plane: The plane, for the log lines that say how the prompts were read.
        emphasis: A1111's emphasis mode (``fulora.generate.prompts.EMPHASIS_MODES``).
        pad: How sides of different lengths meet (``fulora.generate.guidance.PAD_CONDS``).
        empty: The empty prompt's embeddings (:func:`empty_prompt`), for ``pad`` on.
        old_timelines: A1111's "Use old prompt editing timelines" (``schedules.scheduled``).
        inversions: The run's textual-inversion embeddings (None: none), found in both
            prompts as A1111 finds them; the ones used are the result's ``inversions_used``.
        hires_steps: The steps of a hires pass, to schedule them over as A1111 schedules
            them for it (``steps`` the first pass's); None: the first pass's.
    """
    reading = {"old_timelines": old_timelines, "hires_steps": hires_steps}
    parts = read_prompt(prompt, steps, **reading)
    sides = parts
    if negative is not None:
        sides = sides + read_prompt(negative, steps, negative=True, **reading)
    empty_chunk = a1111_chunks(pipe.tokenizer, "")[0]
    names = inversions.names if inversions is not None else None
    batches = []
    for side in sides:
        texts = [a1111_chunks(pipe.tokenizer, text, emphasis, names) for text in side.texts]
        count = max(len(chunks) for chunks in texts)
        batches.append([chunks + [empty_chunk] * (count - len(chunks)) for chunks in texts])
    _log_reading(plane, sides, [len(texts[0]) for texts in batches], len(parts))
    normalise = emphasis != "no_norm"
    vectors = inversions.vectors if inversions is not None else None
    embedded = chunked_embeddings(pipe.text_encoder, batches, clip_skip, device, normalise, vectors)
    scheduled = [
        (side.weight, Scheduled(tuple(end for end, _ in side.schedule), hidden))
        for side, hidden in zip(sides, embedded, strict=True)
    ]
    negative_side = scheduled[-1][1] if negative is not None else None
    stacked = stacked_parts(scheduled[: len(parts)])
    empty = empty.to(device) if empty is not None else None
    used = dict.fromkeys(name for b in batches for t in b for c in t for _, name in c.fixes)
    return Conditioning(stacked, negative_side, pad, empty, tuple(used))


def empty_prompt(pipe, clip_skip: int, device: torch.device | str) -> torch.Tensor:
    """The empty prompt's embeddings (1, 77, channels), A1111's ``cond_stage_model_empty_prompt``.

    A1111 encodes it when it loads the model, before any LoRA applies: call this before the
    run's LoRA is loaded. It pads a side with "Pad prompt/negative prompt" on.
    """
    [hidden] = chunked_embeddings(
        pipe.text_encoder, [[[a1111_chunks(pipe.tokenizer, "")[0]]]], clip_skip, device
    )
    return hidden


def unet_rows(prompts: list[str], steps: int, guided: bool) -> int:
    """UNet rows per image: one per ``AND`` part (the most of any prompt), one for the negative."""
    return max(len(read_prompt(prompt, steps)) for prompt in prompts) + guided


def _log_reading(
    plane: str, sides: list[PromptPart], chunk_counts: list[int], prompt_parts: int
) -> None:
    """Say what A1111's prompt language made of a plane's prompts, where it is more than text.

    Args:
        plane: The plane.
        sides: The prompt's parts, then the negative prompt's, if guided.
        chunk_counts: Each side's chunks.
        prompt_parts: How many of ``sides`` are the prompt's.
    """
    names = ["prompt"] if prompt_parts == 1 else [f"part {i + 1}" for i in range(prompt_parts)]
    names += ["negative prompt"] * (len(sides) - prompt_parts)
    if max(chunk_counts) > 1:  # A1111 shows the count as "90/150" tokens
        counts = ", ".join(f"{n} {c}" for n, c in zip(names, chunk_counts, strict=True))
        logger.info("%s: chunks of 75 tokens, as A1111 encodes them: %s", plane, counts)
    edited = [
        f"{name}: {len(set(side.texts))} texts, {_changes(len(side.schedule) - 1)}"
        for name, side in zip(names, sides, strict=True)
        if len(side.schedule) > 1
    ]
    if edited:
        logger.info("%s: edited during sampling as A1111 edits it: %s", plane, "; ".join(edited))
    weights = [side.weight for side in sides[:prompt_parts]]
    if weights != [1.0]:
        shown = ", ".join(f"{weight:g}" for weight in weights)
        logger.info("%s: prompt parts guided with weights %s, as A1111's AND", plane, shown)


def _changes(count: int) -> str:
    return f"{count} change" + ("s" if count != 1 else "")
