"""AUTOMATIC1111's extra networks in a prompt, ``<lora:name:weight>``, read as A1111 reads them.

A1111 takes every ``<kind:arguments>`` out of a prompt before it reads anything else
(``modules/extra_networks.parse_prompt``): the text left is the prompt it encodes, and each
``<lora:...>`` applies a LoRA to that image (``extensions-builtin/Lora/extra_networks_lora``):

- ``<lora:name>`` at 1, ``<lora:name:w>`` at ``w``: the text encoder's and the UNet's layers;
- ``<lora:name:te:unet>``, or ``te=`` and ``unet=``: each its own multiplier;
- ``lyco`` is another name of ``lora``;
- A1111 reads networks in the prompt only: in a negative prompt the tag is text.

fulora runs one LoRA file (``lora``, ``--lora``), so a tag must name that file as A1111
finds it, by its name or by the alias in its metadata (``ss_output_name``). A tag's weights
take the place of ``lora_scale`` for that plane. What fulora would not run as A1111 does is
refused: another LoRA, another kind of network, a dynamic rank (``dyn``), a named argument
A1111 ignores, a LoRA named twice. Checked against A1111's own functions in
``tests/test_parity.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NoReturn

from fulora.errors import ConfigError

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra_networks.re_extra_net
_LORA_KINDS = ("lora", "lyco")  # A1111 registers 'lyco' as another name of its LoRA network
# fulora's lora_scale range: past +-4 images break down
MAX_WEIGHT = 4.0


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` of a prompt: the LoRA it names and its two multipliers."""

    name: str
    text_encoder: float  # A1111's te_multiplier
    unet: float  # A1111's unet_multiplier
    written: str  # the tag as written, for messages


def without_networks(text: str) -> str:
    """The prompt A1111 encodes: every ``<kind:arguments>`` taken out, nothing else changed."""
    return _TAG.sub("", text)


def network_spans(text: str) -> list[tuple[int, int]]:
    """Where each ``<kind:arguments>`` A1111 takes out of the prompt starts and ends."""
    return [match.span() for match in _TAG.finditer(text)]


def lora_tags(text: str, what: str) -> list[LoraTag]:
    """The ``<lora:...>`` tags of a prompt, with the multipliers A1111 reads from them.

    Args:
        text: The prompt as written.
        what: Which prompt, for the message ("prompts.brain").

    Returns:
        The prompt's LoRA tags in order; empty if it has none.

    Raises:
        ConfigError: A network fulora does not run as A1111 runs it, named with what to do.
    """
    tags = [_lora_tag(match, what) for match in _TAG.finditer(text)]
    names = [tag.name for tag in tags]
    for tag in tags:
        if names.count(tag.name) > 1:  # A1111 loads it once per tag, each adding its change
            _refuse(what, tag.written, "names a LoRA that another tag names too: keep one tag")
    return tags


def _lora_tag(match: re.Match, what: str) -> LoraTag:
    """A1111's ``ExtraNetworkParams`` and ``ExtraNetworkLora.activate`` on one tag."""
    kind, written = match.group(1), match.group()
    if kind not in _LORA_KINDS:
        _refuse(
            what, written, f"loads a {kind!r} network; fulora applies a LoRA only: remove the tag"
        )
    positional, named = [], {}
    for item in match.group(2).split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:  # as A1111 splits them: 'a=b=c' is positional
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if "dyn" in named or len(positional) > 3:
        _refuse(what, written, "sets a dynamic rank (dyn), which fulora does not apply: remove it")
    if set(named) - {"te", "unet"}:
        unknown = sorted(set(named) - {"te", "unet"})
        _refuse(what, written, f"has arguments A1111 ignores ({', '.join(unknown)}): remove them")
    if not positional:
        _refuse(what, written, "names no LoRA; write <lora:name:weight>")
    text_encoder = _weight(positional[1], what, written) if len(positional) > 1 else 1.0
    text_encoder = _weight(named.get("te"), what, written, text_encoder)
    unet = _weight(positional[2], what, written) if len(positional) > 2 else text_encoder
    unet = _weight(named.get("unet"), what, written, unet)
    return LoraTag(positional[0], text_encoder, unet, written)


def _weight(value: str | None, what: str, written: str, default: float = 1.0) -> float:
    """A multiplier as A1111's ``float()`` reads it, within fulora's range of LoRA weights."""
    if value is None:
        return default
    try:
        weight = float(value)
    except ValueError:
        _refuse(what, written, f"has the weight {value!r}, not a number (A1111 fails on it)")
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        _refuse(what, written, f"has the weight {value!r}; give one from -4 to 4")
    return weight


def _refuse(what: str, written: str, why: str) -> NoReturn:
    raise ConfigError(f"{what}: the tag {written!r} {why}")


def plane_lora_weights(
    text: str, what: str, default: float, names: tuple[str, ...] | None
) -> tuple[float, float]:
    """The (text encoder, UNet) multipliers of the LoRA for a plane's prompt.

    Args:
        text: The plane's prompt as written.
        what: Which prompt, for the message.
        default: ``lora_scale``, for a prompt without a tag.
        names: The names A1111 finds the run's LoRA by (file name, alias); None: no LoRA.

    Raises:
        ConfigError: A tag names another LoRA, or there is no LoRA to apply.
    """
    tags = lora_tags(text, what)
    if not tags:
        return default, default
    for tag in tags:
        if names is None:
            _refuse(
                what,
                tag.written,
                "names a LoRA, and the run has none: give its file in lora (--lora)",
            )
        if tag.name not in names:
            listed = " or ".join(repr(n) for n in names)
            _refuse(
                what,
                tag.written,
                f"names a LoRA other than the run's, which A1111 finds as {listed}: "
                f"write <lora:{names[0]}:...>",
            )
    return tags[0].text_encoder, tags[0].unet
