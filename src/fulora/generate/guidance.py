"""Classifier-free guidance between a prompt and a negative prompt of different lengths.

AUTOMATIC1111 encodes a prompt over 75 tokens, or with ``BREAK``, in chunks of 77 tokens
(``fulora.generate.prompts.a1111_chunks``). When the prompt and the negative prompt have
different chunk counts, A1111 runs the UNet on each on its own (its default: the "Pad
prompt/negative prompt" setting off). Diffusers' pipeline runs both in one batch and needs them
the same shape, so fulora pads the shorter one and masks the padding out of the UNet's
cross-attention: each then attends to its own tokens only, as alone (the masked keys' weights are
exactly 0; tested against separate passes in ``tests/generate/test_guidance.py``). With that
setting on (``pad_conds``), the sides are padded as A1111 pads them and attend to all of it
(:func:`pad_conds`).

A prompt with editing, alternation or ``AND`` (``fulora.generate.schedules``) conditions each
UNet call on that call's entries, and guides each ``AND`` part with its weight, as A1111's
``CFGDenoiser`` does (:func:`guided`). A1111's "Skip Early CFG" and "NGMS" leave the negative
prompt's rows out of some calls (:class:`UncondSkip`), which then cost the UNet fewer rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    if positive.shape[1] == negative.shape[1]:
        return positive, negative, None
    both, keep = _one_length([negative, positive])
    return both[1:], both[:1], keep


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


@dataclass(frozen=True)
class Scheduled:
    """One prompt's embeddings step by step (A1111's ``ScheduledPromptConditioning`` list).

    Attributes:
        ends: Each entry's last step (``fulora.generate.schedules.PromptPart.schedule``).
        embeddings: Each entry's embeddings (entries, tokens, channels).
    """

    ends: tuple[int, ...]
    embeddings: torch.Tensor

    def at(self, call: int) -> torch.Tensor:
        """The embeddings (1, tokens, channels) for the model call counted ``call`` (from 0).

        A1111's ``reconstruct_cond_batch``: the first entry whose last step is at least
        ``call``, and the first entry if none is (a sampler calling the model more often).
        """
        index = next((i for i, end in enumerate(self.ends) if call <= end), 0)
        return self.embeddings[index : index + 1]


#: A1111's "Pad prompt/negative prompt" settings: off (its default), on ("Pad conds"), v0
PAD_CONDS = ("off", "on", "v0")


def pad_conds(
    prompt: torch.Tensor, negative: torch.Tensor, mode: str, empty: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's rows and the negative's at one length, as A1111's ``CFGDenoiser`` pads them.

    Args:
        prompt: The prompt's parts (parts, tokens, channels).
        negative: The negative prompt's (1, tokens, channels).
        mode: ``on`` (A1111's "Pad prompt/negative prompt", written "Pad conds"): the shorter
            side gets the empty prompt's chunk once per chunk it lacks; ``v0`` ("Pad conds
            v0", how A1111's DDIM padded before v1.6): the negative gets its last token's
            embedding repeated, or is cut to the prompt's length; ``off``: as they are.
        empty: The empty prompt's embeddings (1, 77, channels), needed with ``on``.
    """
    length, other = prompt.shape[1], negative.shape[1]
    if mode == "off" or length == other:
        return prompt, negative
    if mode == "v0":
        if other > length:
            return prompt, negative[:, :length]
        return prompt, torch.cat([negative, negative[:, -1:].expand(-1, length - other, -1)], 1)
    chunks = (length - other) // empty.shape[1]  # whole chunks: each side is chunks of 77
    if chunks < 0:
        return torch.cat([prompt, empty.repeat(prompt.shape[0], -chunks, 1)], 1), negative
    return prompt, torch.cat([negative, empty.repeat(negative.shape[0], chunks, 1)], 1)


@dataclass(frozen=True)
class Conditioning:
    """What a plane's images are conditioned on: the prompt's weighted parts and the negative.

    Attributes:
        parts: ``(weight, Scheduled)`` per ``AND`` part of the prompt, all of one length
            (A1111's ``stack_conds`` repeats a shorter part's last embedding).
        negative: The negative prompt's, or None without classifier-free guidance.
        pad: How sides of different lengths meet (:data:`PAD_CONDS`; off: masked, as apart).
        empty: The empty prompt's embeddings, for ``pad`` on.
    """

    parts: tuple[tuple[float, Scheduled], ...]
    negative: Scheduled | None
    pad: str = "off"
    empty: torch.Tensor | None = None
    #: the textual-inversion embeddings the prompts used, the prompt's first (A1111's order)
    inversions_used: tuple[str, ...] = ()

    @property
    def padded(self) -> bool:
        """Whether the sides are padded as A1111 pads them: ``pad`` set, and lengths differ."""
        if self.pad == "off" or self.negative is None:
            return False
        return self.parts[0][1].embeddings.shape[1] != self.negative.embeddings.shape[1]

    def at(self, call: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each part's embeddings and the negative's for model call ``call``, padded per ``pad``."""
        parts = [scheduled.at(call) for _, scheduled in self.parts]
        if self.negative is None:
            return parts, None
        prompt, negative = pad_conds(torch.cat(parts), self.negative.at(call), self.pad, self.empty)
        return list(prompt.split(1)), negative

    @classmethod
    def fixed(cls, positive: torch.Tensor, negative: torch.Tensor | None) -> Conditioning:
        """One prompt of weight 1 and one negative (or None), the same at every call.

        Args:
            positive: The prompt's embeddings (1, tokens, channels).
            negative: The negative prompt's, or None without classifier-free guidance.
        """
        negative_side = Scheduled((0,), negative) if negative is not None else None
        return cls(((1.0, Scheduled((0,), positive)),), negative_side)

    @property
    def plain(self) -> bool:
        """One prompt of weight 1 and one text on each side: diffusers' own guidance is A1111's."""
        sides = [scheduled for _, scheduled in self.parts]
        sides += [self.negative] if self.negative is not None else []
        return (
            len(self.parts) == 1
            and self.parts[0][0] == 1.0
            and all(len(side.ends) == 1 for side in sides)
        )

    def first(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first call's (prompt, negative) embeddings: what the pipeline is handed."""
        parts, negative = self.at(0)
        return parts[0], negative


def stacked_parts(
    parts: list[tuple[float, Scheduled]],
) -> tuple[tuple[float, Scheduled], ...]:
    """``AND`` parts at one length: a shorter part's last embedding repeated, as A1111 does."""
    length = max(scheduled.embeddings.shape[1] for _, scheduled in parts)
    stacked = []
    for weight, scheduled in parts:
        hidden = scheduled.embeddings
        repeats = length - hidden.shape[1]
        if repeats:
            hidden = torch.cat([hidden, hidden[:, -1:].expand(-1, repeats, -1)], dim=1)
        stacked.append((weight, Scheduled(scheduled.ends, hidden)))
    return tuple(stacked)


@dataclass(frozen=True)
class UncondSkip:
    """The model calls that run without the negative prompt, as A1111's ``CFGDenoiser`` skips.

    "Skip Early CFG" (its setting skip_early_cond) skips every call counted ``call`` (from 0)
    with ``call / total_steps`` at most ``early``; else "NGMS" (Negative Guidance minimum
    sigma, s_min_uncond) every odd call whose sigma is below ``ngms`` (every such call with
    ``ngms_all``, its "NGMS all steps"). A skipped call's prediction is the first ``AND`` part's
    plus each part's difference from it times its weight, unguided (A1111's cond_scale 1).

    Attributes:
        guidance: The pipeline's guidance scale (its ``u + g (p - u)`` is undone on a skip).
        total_steps: A1111's expected model calls (``fulora.generate.schedules.schedule_steps``).
        early: Skip Early CFG's share of the calls (0: none).
        ngms: NGMS's sigma (0: none).
        ngms_all: NGMS on every call, not every other one.
        sigma_of: The k-diffusion sigma of a UNet timestep (needed with ngms).
    """

    guidance: float
    total_steps: int
    early: float = 0.0
    ngms: float = 0.0
    ngms_all: bool = False
    sigma_of: Callable[[torch.Tensor], float] | None = None

    def skips(self, call: int, timestep: torch.Tensor) -> bool:
        """Whether model call ``call`` (from 0), at ``timestep``, runs without the negative."""
        if self.early and call / self.total_steps <= self.early:
            return True
        if not self.ngms or not (call % 2 or self.ngms_all):
            return False
        return self.sigma_of(timestep) < self.ngms


@contextmanager
def guided(
    unet: torch.nn.Module,
    conditioning: Conditioning,
    images: int,
    skip: UncondSkip | None = None,
) -> Iterator[None]:
    """Every UNet call inside the block conditioned as A1111 conditions it, call by call.

    A plain conditioning without ``skip`` changes nothing but masking a shorter side's padding
    (:func:`cross_attention_mask`). Otherwise hooks count the UNet's calls as A1111 counts its
    steps and, at each, give every image each part's and the negative prompt's embeddings for
    that call; with guidance they run one row per part and return, as the prompt's prediction,
    the negative's plus each part's difference from it times its weight, so diffusers'
    guidance ``u + g (p - u)`` is A1111's ``u + g sum(w (c - u))`` (``combine_denoised``).
    A call that ``skip`` skips runs the parts' rows only.

    Args:
        unet: The pipeline's UNet (compiled or not).
        conditioning: The plane's conditioning (:class:`Conditioning`).
        images: The images of the batch (the pipeline's rows per side).
        skip: Which calls run without the negative prompt (None: none).
    """
    if conditioning.negative is None:
        skip = None  # unguided: no negative rows to leave out
    if conditioning.plain and skip is None:
        positive, negative = conditioning.first()
        keep = None if negative is None else padded_sides(positive, negative)[2]
        with cross_attention_mask(unet, _per_image(keep, images)):
            yield
        return
    hooks = _StepHooks(conditioning, images, skip)
    handles = [
        unet.register_forward_pre_hook(hooks.before, with_kwargs=True),
        unet.register_forward_hook(hooks.after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_image(keep: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Each side's token mask for every image of a batch: n negative rows, then n positive."""
    return None if keep is None else keep.repeat_interleave(n, dim=0)


class _StepHooks:
    """The UNet's inputs and output at each call of a scheduled or ``AND`` conditioning."""

    def __init__(self, conditioning: Conditioning, images: int, skip: UncondSkip | None) -> None:
        self.conditioning = conditioning
        self.images = images
        self.skip = skip
        self.call = 0  # A1111's CFGDenoiser.step
        self.skipping = False  # this call runs without the negative prompt

    def before(self, module, args, kwargs):
        sample, timestep, *rest = args  # diffusers' pipelines: (sample, t, encoder_hidden_states=)
        rows, negative = self.conditioning.at(self.call)
        self.skipping = self.skip is not None and self.skip.skips(self.call, timestep)
        if negative is not None:  # rows: the negative (unless skipped), then each part
            if not self.skipping:
                rows.insert(0, negative)
            sample, timestep = (_rows_for(t, self.images, len(rows)) for t in (sample, timestep))
        hidden, keep = _one_length(rows)
        hidden = hidden.repeat_interleave(self.images, 0)
        if rest:  # given by position
            rest[0] = hidden
        else:
            kwargs = {**kwargs, "encoder_hidden_states": hidden}
        if keep is not None:
            kwargs = {**kwargs, "encoder_attention_mask": keep.repeat_interleave(self.images, 0)}
        return (sample, timestep, *rest), kwargs

    def after(self, module, args, kwargs, output):
        self.call += 1
        if self.conditioning.negative is None:
            return output
        predicted = output[0]
        if self.skipping:  # A1111's stand-in: the first part's prediction, guided at 1
            parts = predicted.split(self.images)
            uncond = parts[0]
            scale = 1.0 / self.skip.guidance  # which the pipeline's u + g (p - u) undoes
        else:
            uncond, *parts = predicted.split(self.images)
            scale = 1.0
        prompt = uncond.clone()
        for (weight, _), part in zip(self.conditioning.parts, parts, strict=True):
            prompt += (part - uncond) * (weight * scale)
        combined = torch.cat([uncond, prompt])
        if isinstance(output, tuple):
            return (combined, *output[1:])
        output[next(iter(output.keys()))] = combined  # diffusers' output dataclass (.sample)
        return output


def _rows_for(value, images: int, sides: int):
    """One image's input (the pipeline's second half) repeated for every side."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != 2 * images:
        return value
    return value[images:].repeat(sides, *[1] * (value.ndim - 1))


def _one_length(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (1, tokens, channels) padded to one length, and which tokens are real (or None)."""
    length = max(row.shape[1] for row in rows)
    if all(row.shape[1] == length for row in rows):
        return torch.cat(rows), None
    keep = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for index, row in enumerate(rows):
        keep[index, : row.shape[1]] = True
    return torch.cat([_padded(row, length) for row in rows]), keep
