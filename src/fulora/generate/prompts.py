r"""AUTOMATIC1111's prompt language, read as A1111 reads it, or refused.

Each PNG carries its prompt in AUTOMATIC1111's settings text, so a prompt must make the same
image in both. A1111 reads a prompt language in the text; fulora reads its emphasis as A1111
does (:func:`parse_emphasis`, :func:`a1111_token_ids`) and refuses the rest, which diffusers'
pipeline cannot run as A1111 runs it (:func:`check_prompt_syntax`):

- emphasis, read alike: ``(word)`` multiplies the word's embeddings by 1.1, ``[word]`` divides
  them by 1.1, ``(word:1.3)`` multiplies them by 1.3; ``\(`` ``\)`` ``\[`` ``\]`` ``\\``
  are the characters themselves. A1111's default emphasis ("Original") then rescales the weighted
  embeddings to the unweighted ones' mean (``fulora.lora.conditioning.emphasise``).
- refused: ``[a:b:10]`` switches prompts during sampling, ``[a|b]`` alternates them, ``AND``
  composes prompts, a positive prompt ending in ``:1.5`` scales its guidance (A1111 reads it as
  a one-prompt ``AND``), ``BREAK`` and a prompt over 75 tokens are encoded in chunks, and
  ``<lora:name:0.8>`` loads a network. A weight with spaces, ``(word: 1.3)``, is refused too:
  A1111's versions differ (newer ones read a weight, older ones text).

Kohya's training (without ``--weighted_captions``) reads its captions as plain text; a
caption becomes a generation prompt read as A1111 reads it.
"""

from __future__ import annotations

import re

from fulora.errors import ConfigError

_ESCAPABLE = "()[]\\"
# A1111's emphasis weight: ':' number ')', with no space (older versions allowed none)
_WEIGHT = re.compile(r":([+-]?[.\d]+)\)")
_SPACED_WEIGHT = re.compile(r":\s*[+-]?[.\d]+\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_UNREAD = re.compile(r"\bAND\b|\bBREAK\b|<\w+:|\|")
# A1111 splits the positive prompt at AND and reads a trailing ':number' of each part as its
# weight in the guidance (prompt_parser.re_weight), also when there is no AND
_GUIDANCE_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")
# a closing bracket: its opening one and its factor; a weight ':1.3)' closes '(' with 1.3
_CLOSES = {")": ("(", 1.1), "]": ("[", 1 / 1.1)}


def check_prompt_syntax(text: str, what: str, *, negative: bool = False) -> None:
    """Refuse a prompt that AUTOMATIC1111 would read otherwise than fulora.

    Args:
        text: The prompt.
        what: Which prompt, for the message ("the prompt of brain", "negative_prompt").
        negative: A negative prompt, which A1111 does not split at ``AND`` nor weight.

    Raises:
        ConfigError: Naming the piece of syntax, where it is and what to do.
    """
    found = _first_unread(text, negative)
    if found is None:
        return
    at, piece, kind = found
    meaning, fix = _UNREAD_KINDS[kind]
    raise ConfigError(
        f"{what} {text!r} holds {piece!r} (at character {at + 1}), which AUTOMATIC1111 reads "
        f"as {meaning}; fulora reads A1111's emphasis ('(word)', '[word]', '(word:1.3)') as "
        "A1111 does, but not this, so the two would make different images from the same "
        f"settings: {fix}"
    )


_ONE_PROMPT = "write the prompt without it"
_UNREAD_KINDS = {  # kind: (what A1111 reads it as, what to do)
    "AND": ("composing prompts", _ONE_PROMPT),
    "BREAK": ("a new 75-token chunk", _ONE_PROMPT),
    "|": ("alternating prompts ('[a|b]')", _ONE_PROMPT),
    "switch": ("switching prompts during sampling ('[a:b:10]')", _ONE_PROMPT),
    "network": (
        "loading a network ('<lora:name:0.8>')",
        "give a LoRA in lora and lora_scale (--lora, --lora-scale)",
    ),
    "guidance": (
        "the prompt's weight in the guidance",
        "set the guidance (--guidance) instead, or write the number without the ':'",
    ),
    "spaced": (
        "a weight in newer versions and as text in older ones",
        "write the weight without spaces, '(word:1.3)'",
    ),
    "nan": ("an emphasis weight that is not a number (an error)", "write '(word:1.3)'"),
    "backslash": (
        "nothing (it drops a backslash before anything but ( ) [ ] \\)",
        "write \\( \\) \\[ \\] \\\\ for those characters, or no backslash",
    ),
}


def _first_unread(text: str, negative: bool) -> tuple[int, str, str] | None:
    """(position, piece, kind) of the first syntax fulora does not read (kinds: _UNREAD_KINDS)."""
    found = [
        (match.start(), match.group(), match.group() if match.group()[0] != "<" else "network")
        for match in _UNREAD.finditer(text)
        if not (negative and match.group() == "AND")  # a word in A1111's negative prompt
    ]
    found += [
        (match.start(), match.group(), "spaced")
        for match in _SPACED_WEIGHT.finditer(text)
        if not _WEIGHT.fullmatch(match.group())
    ]
    found += [
        (match.start(), match.group(), "nan")
        for match in _WEIGHT.finditer(text)
        if not _is_number(match.group(1))
    ]
    found += _switches_and_escapes(text)
    weight = None if negative else _GUIDANCE_WEIGHT.search(text)
    if weight is not None:
        found.append((weight.start(), weight.group(), "guidance"))
    return min(found) if found else None


def _switches_and_escapes(text: str) -> list[tuple[int, str, str]]:
    """A ':' inside square brackets (prompt switching), and a backslash before another character."""
    depth, at = 0, 0
    while at < len(text):
        char = text[at]
        if char == "\\":
            if text[at + 1 : at + 2] not in _ESCAPABLE or at + 1 == len(text):
                return [(at, text[at : at + 2], "backslash")]
            at += 2
            continue
        depth += (char == "[") - (char == "]" and depth > 0)
        if char == ":" and depth:
            return [(at, char, "switch")]
        at += 1
    return []


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A prompt's pieces and their emphasis weights, as AUTOMATIC1111 parses them.

    A1111's ``prompt_parser.parse_prompt_attention`` (its default emphasis): a bracket applies
    to everything parsed since it opened, an unclosed one to the end, a closing bracket with
    none open is text, and neighbouring pieces of the same weight are joined. Checked against
    A1111's own function in ``tests/test_parity.py``.

    Args:
        text: A prompt that :func:`check_prompt_syntax` accepts (``BREAK`` is refused here).

    Returns:
        ``(text, weight)`` pieces, at least one.
    """
    if re.search(r"\bBREAK\b", text):
        raise ValueError(f"{text!r}: BREAK starts a new chunk, which fulora does not encode")
    pieces: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for kind, value in _lexemes(text):
        if kind == "open":
            opened[value].append(len(pieces))
        elif kind == "weight" and opened["("]:
            weigh(opened["("].pop(), float(value[1:-1]))
        elif kind == "close" and opened[_CLOSES[value][0]]:
            weigh(opened[_CLOSES[value][0]].pop(), _CLOSES[value][1])
        else:  # text, and a closing bracket or weight with no bracket open
            pieces.append([value, 1.0])
    for closing in ")]":  # brackets left open apply to the end: round ones first
        opening, factor = _CLOSES[closing]
        for start in opened[opening]:
            weigh(start, factor)
    return _joined(pieces or [["", 1.0]])


def _lexemes(text: str):
    """``(kind, value)`` of the prompt's tokens: text, open, close, or weight (``':1.3)'``)."""
    at = 0
    while at < len(text):
        char = text[at]
        if char == "\\":  # an escaped character is text; a lone backslash is dropped
            escaped = text[at + 1 : at + 2]
            step = 2 if escaped and escaped in _ESCAPABLE else 1
            yield "text", text[at + 1 : at + step]
        elif char in "([":
            step = 1
            yield "open", char
        elif char in ")]":
            step = 1
            yield "close", char
        elif char == ":" and (weight := _WEIGHT.match(text, at)):
            step = weight.end() - at
            yield "weight", weight.group()
        else:
            run = _TEXT_RUN.match(text, at)
            step = run.end() - at if run else 1
            yield "text", text[at : at + step]
        at += step


def _joined(pieces: list[list]) -> list[tuple[str, float]]:
    """Neighbouring pieces of exactly the same weight as one."""
    joined = [pieces[0]]
    for text, weight in pieces[1:]:
        if weight == joined[-1][1]:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    return [(text, weight) for text, weight in joined]


def a1111_token_ids(tokenizer, text: str, what: str) -> tuple[list[int], list[float]]:
    """A prompt's token ids and per-token weights, laid out as AUTOMATIC1111 lays out one chunk.

    Each emphasis piece is tokenized on its own, then: the start token, the pieces' tokens, the
    end token, padding to the tokenizer's length (77). For a plain prompt these are the ids
    diffusers' and kohya's tokenizer call gives.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        text: The prompt.
        what: Which prompt, for the message.

    Returns:
        (ids, weights), each of the tokenizer's length; weight 1 outside the prompt's words.

    Raises:
        ConfigError: If the prompt is over the tokenizer's window (75 tokens for CLIP), which
            A1111 encodes in chunks.
    """
    pieces = parse_emphasis(text)
    ids: list[int] = []
    weights: list[float] = []
    tokens = tokenizer([piece for piece, _ in pieces], add_special_tokens=False).input_ids
    for piece_ids, (_, weight) in zip(tokens, pieces, strict=True):
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    window = tokenizer.model_max_length - 2  # the start and end tokens
    if len(ids) > window:
        raise ConfigError(
            f"{what} {text!r} is {len(ids)} tokens, over CLIP's {window}: AUTOMATIC1111 encodes "
            f"a longer prompt in chunks of {window}, which fulora does not, so the two would "
            "make different images: shorten it"
        )
    padding = [tokenizer.pad_token_id] * (window - len(ids))
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *padding]
    return ids, [1.0, *weights, *[1.0] * (1 + len(padding))]
