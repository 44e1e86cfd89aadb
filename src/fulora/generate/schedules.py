r"""Prompt editing, alternation and ``AND``, scheduled as AUTOMATIC1111 schedules them.

A1111 reads three things in a prompt that change what the UNet is conditioned on, and when:

- ``[from:to:when]`` edits the prompt during sampling: ``from`` until step ``when``, then
  ``to`` (``[to:when]`` adds, ``[from::when]`` removes). A whole number is a step, a number
  with a point a fraction of the steps (``0.25``: a quarter);
- ``[a|b|c]`` alternates the words at every step;
- ``AND`` splits the (positive) prompt into parts, each with its own prediction, combined in
  the guidance with the weight after its last ``:`` (``a cat :1.2 AND a dog :0.8``); a
  prompt without ``AND`` may carry such a weight too.

:func:`read_prompt` gives each part's weight and its text at each step (A1111's
``get_multicond_prompt_list`` and ``get_learned_conditioning_prompt_schedules``, with its
current scheduling and without hires fix); each text is then read for emphasis and chunks by
``fulora.generate.prompts``. A1111 counts a "step" each time its sampler calls the model,
over ``steps`` calls, or ``2 x steps`` for a second-order sampler (Heun): :func:`schedule_steps`.
So ``[a:b:10]`` at 20 Heun steps changes after the 10th model call, at the 5th step, as in A1111.
A prompt A1111's grammar cannot parse is not scheduled at all: it is read as written, brackets
and all (``a | b [c:d:5]``, whose ``|`` is outside brackets, is one text).

Checked against A1111's own functions on 20,000 random prompts and a table of recorded
answers (``tests/test_parity.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache

import lark

from fulora.generate.networks import without_networks

# A1111's prompt-editing grammar (prompt_parser.schedule_parser), the language itself: its
# parse decides what is an edit, so fulora parses with the same rules and the same parser
# (lark's Earley). Brackets and ':' that fit no rule are text (the bracket runs of `start`).
_GRAMMAR = r"""
!start: (text | /[][():]/+)*
text: (emphasis | edit | alternation | words | SPACE)*
!emphasis: "(" text ")"
        | "(" text ":" text ")"
        | "[" text "]"
edit: "[" [text ":"] text ":" [SPACE] NUMBER [SPACE] "]"
alternation: "[" text ("|" [text])+ "]"
SPACE: /\s+/
words: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""

# A1111 splits the positive prompt at AND (prompt_parser.re_AND) and reads a part's trailing
# ':number' as its weight (re_weight); the part's trailing whitespace goes, its leading stays
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)

# A1111's second-order samplers call the model twice a step, and it counts both calls (its
# SamplerData.total_steps: steps x 2 for those whose options say second_order, v1.6+)
SECOND_ORDER = frozenset({"heun", "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras"})
SECOND_ORDER |= {"dpmpp_2s_a", "dpmpp_2s_a_karras", "dpmpp_sde", "dpmpp_sde_karras", "restart"}


@dataclass(frozen=True)
class PromptPart:
    """One ``AND`` part of a prompt: its weight in the guidance and its text step by step.

    Attributes:
        weight: The part's guidance weight (1 without a trailing ``:number``).
        schedule: ``(last step, text)`` pairs, A1111's ``(end_at_step, text)``: a model call
            counted ``c`` (from 0) uses the first pair whose last step is at least ``c``.
    """

    weight: float
    schedule: tuple[tuple[int, str], ...]

    @property
    def texts(self) -> list[str]:
        """The part's texts in the order of the schedule."""
        return [text for _, text in self.schedule]


def schedule_steps(sampler: str, steps: int) -> int:
    """The steps A1111 schedules a prompt over: its model calls, two a step for Heun.

    Args:
        sampler: fulora's sampler name (``fulora.generate.samplers.resolve_sampler``).
        steps: The sampling steps.
    """
    return steps * 2 if sampler in SECOND_ORDER else steps


def read_prompt(
    text: str,
    steps: int,
    *,
    negative: bool = False,
    old_timelines: bool = False,
    hires_steps: int | None = None,
) -> list[PromptPart]:
    """A prompt's ``AND`` parts, each with its weight and its text at every step.

    A prompt's ``<lora:...>`` tags are taken out first, as A1111 takes them out
    (``fulora.generate.networks``); a negative prompt's are text to A1111.

    Args:
        text: The prompt as written.
        steps: The steps it is scheduled over (:func:`schedule_steps`).
        negative: A negative prompt, which A1111 does not split at ``AND`` nor weight.
        old_timelines: A1111's "Use old prompt editing timelines" (:func:`scheduled`).
        hires_steps: For a hires pass, its steps (:func:`schedule_steps`); ``steps`` are then
            the first pass's (:func:`scheduled`).

    Returns:
        One part for a negative prompt or a prompt without ``AND``.
    """
    if negative:
        return [PromptPart(1.0, scheduled(text, steps, old_timelines, hires_steps))]
    parts = []
    for part in _AND.split(without_networks(text)):
        words, weight = _PART_WEIGHT.fullmatch(part).groups()
        schedule = scheduled(words, steps, old_timelines, hires_steps)
        parts.append(PromptPart(float(weight) if weight else 1.0, schedule))
    return parts


@lru_cache(maxsize=1024)  # a prompt is read by the config check, the plan and the encoding
def scheduled(
    text: str, steps: int, old_timelines: bool = False, hires_steps: int | None = None
) -> tuple[tuple[int, str], ...]:
    """A prompt's ``(last step, text)`` pairs as A1111 edits and alternates it; one if neither.

    An edit's number is a step if whole, a fraction of the steps if it has a point; with
    ``old_timelines`` (A1111's "Use old prompt editing timelines", its rule before v1.6) a
    fraction if below 1, else a step (``[a:b:2.5]``: step 2).

    A hires pass (``hires_steps``, its steps; ``steps`` the first pass's) is scheduled over its
    own steps, as if they came after the first pass's: a whole number counts from the end of
    the first pass (``[a:b:25]`` after 20 first steps: step 5 of the pass), a number with a
    point from 1 (``1.5``: half the pass's steps), so an edit of the first pass is over at its
    start. With ``old_timelines`` the pass is scheduled as the first pass is (A1111's
    ``get_learned_conditioning_prompt_schedules``).

    The parse takes time on long prompts with brackets (Earley, as in A1111: 2.5 s for 40
    edits in 1,160 characters on this project's CPU); a prompt without '[' has neither edits
    nor alternations, and is its own text without being parsed.
    """
    offsets = (0, 0.0)  # whole steps, fractions, before the steps scheduled over
    if hires_steps is not None and not old_timelines:
        steps, offsets = hires_steps, (steps, 1.0)
    if "[" not in text:
        return ((steps, text),)
    tree = _parse(text)
    if tree is None:  # A1111 reads what its grammar cannot parse as written
        return ((steps, text),)
    whens = {
        id(edit): _edit_step(edit, steps, old_timelines, offsets) for edit in tree.find_data("edit")
    }
    ends = {steps, *(when for when in whens.values() if when >= 1)}
    if any(True for _ in tree.find_data("alternation")):
        ends.update(range(1, steps + 1))  # every step has its own text
    return tuple((end, _text_at(tree, end, whens)) for end in sorted(ends))


@cache
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR)


def _parse(text: str) -> lark.Tree | None:
    try:
        return _parser().parse(text)
    except lark.exceptions.LarkError:
        return None


def _edit_step(
    edit: lark.Tree, steps: int, old_timelines: bool, offsets: tuple[int, float] = (0, 0.0)
) -> int:
    """The last step of an edit's ``from`` text: a whole number, or a fraction of the steps.

    ``offsets``: the steps before those scheduled over, whole and as a fraction (a hires
    pass's, :func:`scheduled`); below 1 the edit is over before the first step.
    """
    number = str(edit.children[-2])
    value = float(number)
    fraction = value < 1 if old_timelines else "." in number
    whole, part = offsets
    return min(steps, int((value - part) * steps if fraction else value - whole))


def _text_at(node: lark.Tree | lark.Token | None, step: int, whens: dict[int, int]) -> str:
    """The prompt's text at ``step``: each edit and alternation resolved, the rest as written."""
    if node is None:  # an edit without 'from', or an empty alternative
        return ""
    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "edit":
        before, after = node.children[:2]
        return _text_at(before if step <= whens[id(node)] else after, step, whens)
    if node.data == "alternation":
        return _text_at(node.children[(step - 1) % len(node.children)], step, whens)
    return "".join(_text_at(child, step, whens) for child in node.children)
