r"""AUTOMATIC1111's prompt language, read as A1111 reads it, or refused.

Each PNG carries its prompt in AUTOMATIC1111's settings text, so a prompt must make the same
image in both. A1111 reads a prompt language in the text; fulora reads its emphasis and
chunks as A1111 does (:func:`parse_emphasis`, :func:`a1111_chunks`) and refuses what it does
not read as A1111 reads it (:func:`check_prompt_syntax`):

- emphasis, read alike: ``(word)`` multiplies the word's embeddings by 1.1, ``[word]`` divides
  them by 1.1, ``(word:1.3)`` multiplies them by 1.3; ``\(`` ``\)`` ``\[`` ``\]`` ``\\``
  are the characters themselves. A1111's default emphasis ("Original") then rescales the weighted
  embeddings to the unweighted ones' mean (``fulora.lora.conditioning.emphasise_together``).
  Its setting "Emphasis" (``emphasis`` here, :data:`EMPHASIS_MODES`) has three more modes:
  "No norm" weights without rescaling, "Ignore" reads the brackets but weights nothing, and
  "None" reads the prompt as plain text, brackets, backslashes and ``BREAK`` included.
- chunks, read alike: a prompt over CLIP's 75 tokens is encoded in chunks of 75, split at a
  comma within the last 20 tokens, and ``BREAK`` starts a new chunk (:func:`a1111_chunks`); a
  prompt and a negative prompt of different chunk counts are guided as A1111 guides them,
  each on its own (``fulora.generate.guidance``).
- prompt editing ``[a:b:10]``, alternation ``[a|b]`` and ``AND`` (with a part's weight,
  ``a cat :1.2``), read alike: each text the prompt takes during sampling is read as above
  (``fulora.generate.schedules``), and each part guided as A1111 guides it
  (``fulora.generate.guidance.guided``).
- ``<lora:name:0.8>``, read alike: taken out of the prompt before anything else, and the
  run's LoRA applied at its weights (``fulora.generate.networks``).
- textual-inversion embeddings, read alike: the name of one of the run's embeddings, found in
  a piece's tokens (:class:`EmbeddingNames`), becomes a placeholder token per vector, the
  vectors put in their place as the prompt is encoded (``fulora.generate.inversions``).
- ``#`` comments, read alike: with A1111's "Enable comments" (``prompt_comments``, on by
  default) from ``#`` to the end of the line is left out first (:func:`strip_comments`);
  off, ``#`` is text.
- refused: ``BREAK`` inside brackets is the word with a negative weight; a network in the
  negative prompt is text to A1111; ``<lora:`` without its ``>`` is text too. A weight with
  spaces, ``(word: 1.3)``, is refused too: A1111's versions differ (newer ones read a
  weight, older ones text).

Kohya's training (without ``--weighted_captions``) reads its captions as plain text; a
caption becomes a generation prompt read as A1111 reads it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from fulora.errors import ConfigError
from fulora.generate.networks import lora_tags, network_spans
from fulora.generate.schedules import read_prompt

_ESCAPABLE = "()[]\\"
# A1111's emphasis weight: ':' number ')', with no space (older versions allowed none)
_WEIGHT = re.compile(r":([+-]?[.\d]+)\)")
_SPACED_WEIGHT = re.compile(r":\s*[+-]?[.\d]+\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_NETWORK = re.compile(r"<\w+:")  # the start of an extra network, '<lora:'
# A1111 splits each text run at BREAK (prompt_parser.re_break), leaving this marker piece
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_MARK = ("BREAK", -1.0)
# a closing bracket: its opening one and its factor; a weight ':1.3)' closes '(' with 1.3
_CLOSES = {")": ("(", 1.1), "]": ("[", 1 / 1.1)}
# fulora's emphasis -> A1111's setting "Emphasis" (modules/sd_emphasis.py, v1.8+; before it,
# "Original" only), which its PNG text names unless it is the default
EMPHASIS_MODES = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}


def check_prompt_syntax(
    text: str,
    what: str,
    steps: int,
    *,
    negative: bool = False,
    guided: bool = True,
    emphasis: str = "original",
    old_timelines: bool = False,
    hires_steps: int | None = None,
) -> None:
    """Refuse a prompt that AUTOMATIC1111 would read otherwise than fulora.

    Each text the prompt takes during sampling (``fulora.generate.schedules``) is checked, in
    the hires pass too.

    Args:
        text: The prompt.
        what: Which prompt, for the message ("the prompt of brain", "negative_prompt").
        steps: The steps A1111 schedules it over (``schedules.schedule_steps``).
        negative: A negative prompt, which A1111 does not split at ``AND`` nor weight.
        guided: Whether the run uses classifier-free guidance (guidance above 1).
        emphasis: The emphasis mode (:data:`EMPHASIS_MODES`); with ``none`` each text is read
            as plain text, so only networks and ``AND`` are checked.
        old_timelines: A1111's "Use old prompt editing timelines" (``schedules.scheduled``).
        hires_steps: The steps of a hires pass (``schedules.schedule_steps``); None: none.

    Raises:
        ConfigError: Naming the piece of syntax, where it is and what to do.
    """
    if not negative:
        lora_tags(text, what)  # A1111 takes them out before it reads the rest
    found = _first_network_or_comment(text, negative)
    if found is not None:
        _refuse(what, repr(text), found)
    parts = read_prompt(text, steps, negative=negative, old_timelines=old_timelines)
    if not guided and (len(parts) > 1 or parts[0].weight != 1.0):
        raise ConfigError(
            f"{what} {text!r} has parts joined by AND or a weight after ':', which A1111 "
            "combines with the negative prompt's prediction in classifier-free guidance; "
            "set guidance (--guidance) above 1, or write the prompt without them"
        )
    if emphasis == "none":  # A1111 tokenizes each text as it is
        return
    passes = [("", parts)]
    if hires_steps is not None:
        hires = read_prompt(text, steps, negative=negative, old_timelines=old_timelines,
                            hires_steps=hires_steps)  # fmt: skip
        passes.append((" of the hires pass", hires))
    for which, pass_parts in passes:
        for part in pass_parts:
            for end, step_text in part.schedule:
                found = _first_unread(step_text)
                if found is not None:
                    shown = repr(text)
                    if step_text != text:  # the text A1111 conditions on at that step
                        shown += f", at step {end}{which} read as {step_text!r},"
                    _refuse(what, shown, found)


def _first_network_or_comment(text: str, negative: bool) -> tuple[int, str, str] | None:
    """(position, piece, kind) of the first network A1111 reads as text."""
    closed = network_spans(text)
    found = [
        (match.start(), match.group(), "negative network" if negative else "unclosed network")
        for match in _NETWORK.finditer(text)
        if negative or not any(start <= match.start() < end for start, end in closed)
    ]
    return min(found) if found else None


# A1111's prompt comments (its setting "Enable comments", on by default, v1.8+): from '#' to
# the end of the line is left out, a line that is all comment with its line break
_COMMENT_LINE = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_COMMENT = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """A prompt without its ``#`` comments, as A1111 strips them before it reads anything.

    Each comment becomes a line break (a line that is all comment, with its own), which CLIP
    reads as a space. A1111 writes the stripped prompt in its settings text, so a text holds no
    ``#`` unless its comments were off (or its version had none): then ``#`` is text. Checked
    against A1111's own function in ``tests/generate/test_generate.py``.
    """
    return _COMMENT.sub("\n", _COMMENT_LINE.sub("\n", text))


def _refuse(what: str, shown: str, found: tuple[int, str, str]) -> None:
    at, piece, kind = found
    meaning, fix = _UNREAD_KINDS[kind]
    raise ConfigError(
        f"{what} {shown} holds {piece!r} (at character {at + 1}), which AUTOMATIC1111 reads "
        f"as {meaning}; fulora reads A1111's emphasis, long prompts, BREAK, prompt editing, "
        "alternation, AND and <lora:...> as A1111 does, but not this, so the two would make "
        f"different images from the same settings: {fix}"
    )


_UNREAD_KINDS = {  # kind: (what A1111 reads it as, what to do)
    "bracketed BREAK": (
        "the word 'BREAK' with a negative weight inside brackets, not a new chunk",
        "close the brackets before BREAK and open them again after it",
    ),
    "negative network": (
        "text in a negative prompt (it loads networks from the prompt only)",
        "write the tag in the prompt, or give the LoRA's weight in lora_scale (--lora-scale)",
    ),
    "unclosed network": (
        "text (a network without its closing '>')",
        "close the tag, '<lora:name:0.8>', or remove it",
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


def _first_unread(text: str) -> tuple[int, str, str] | None:
    """(position, piece, kind) of the first syntax of one text fulora does not read."""
    found = [
        (match.start(), match.group(), "spaced")
        for match in _SPACED_WEIGHT.finditer(text)
        if not _WEIGHT.fullmatch(match.group())
    ]
    found += [
        (match.start(), match.group(), "nan")
        for match in _WEIGHT.finditer(text)
        if not _is_number(match.group(1))
    ]
    found += _stray_backslashes(text)
    if not any(kind == "nan" for *_, kind in found):  # A1111's parse needs numbers
        found += _bracketed_breaks(text)
    return min(found) if found else None


def _stray_backslashes(text: str) -> list[tuple[int, str, str]]:
    """The first backslash before a character A1111 does not escape (it drops the backslash)."""
    at = 0
    while at < len(text):
        if text[at] == "\\":
            if text[at + 1 : at + 2] not in _ESCAPABLE or at + 1 == len(text):
                return [(at, text[at : at + 2], "backslash")]
            at += 1
        at += 1
    return []


def _bracketed_breaks(text: str) -> list[tuple[int, str, str]]:
    """A ``BREAK`` whose marker brackets weighted: A1111 then reads it as a word, not a break."""
    pieces, marks = _parsed(text)
    return [(at, "BREAK", "bracketed BREAK") for index, at in marks if pieces[index][1] != -1.0]


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
    none open is text, ``BREAK`` is a :data:`BREAK_MARK` piece, and neighbouring pieces of the
    same weight are joined. Checked against A1111's own function in ``tests/test_parity.py``.

    Args:
        text: A prompt that :func:`check_prompt_syntax` accepts.

    Returns:
        ``(text, weight)`` pieces, at least one.
    """
    pieces, _ = _parsed(text)
    return _joined(pieces or [["", 1.0]])


def _parsed(text: str) -> tuple[list[list], list[tuple[int, int]]]:
    """The weighted pieces before joining, and each BREAK marker's (piece index, position)."""
    pieces: list[list] = []
    marks: list[tuple[int, int]] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for kind, value, at in _lexemes(text):
        if kind == "open":
            opened[value].append(len(pieces))
        elif kind == "weight" and opened["("]:
            weigh(opened["("].pop(), float(value[1:-1]))
        elif kind == "close" and opened[_CLOSES[value][0]]:
            weigh(opened[_CLOSES[value][0]].pop(), _CLOSES[value][1])
        else:  # text, and a closing bracket or weight with no bracket open
            start = 0
            for match in _BREAK.finditer(value):  # the text around each BREAK (A1111's split)
                pieces.append([value[start : match.start()], 1.0])
                marks.append((len(pieces), at + match.group().index("B") + match.start()))
                pieces.append(list(BREAK_MARK))
                start = match.end()
            pieces.append([value[start:], 1.0])
    for closing in ")]":  # brackets left open apply to the end: round ones first
        opening, factor = _CLOSES[closing]
        for start in opened[opening]:
            weigh(start, factor)
    return pieces, marks


def _lexemes(text: str):
    """``(kind, value, at)`` of the prompt's tokens: text, open, close, or weight (``':1.3)'``)."""
    at = 0
    while at < len(text):
        char = text[at]
        if char == "\\":  # an escaped character is text; a lone backslash is dropped
            escaped = text[at + 1 : at + 2]
            step = 2 if escaped and escaped in _ESCAPABLE else 1
            yield "text", text[at + 1 : at + step], at
        elif char in "([":
            step = 1
            yield "open", char, at
        elif char in ")]":
            step = 1
            yield "close", char, at
        elif char == ":" and (weight := _WEIGHT.match(text, at)):
            step = weight.end() - at
            yield "weight", weight.group(), at
        else:
            run = _TEXT_RUN.match(text, at)
            step = run.end() - at if run else 1
            yield "text", text[at : at + step], at
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


# A1111's comma_padding_backtrack setting (default 20): a chunk that fills up with a comma
# among its last 20 tokens ends at that comma, and the words after it open the next chunk
COMMA_BACKTRACK = 20
# A1111's chunk_length: CLIP's 77 positions less the start and end tokens (not read from the
# tokenizer, whose model_max_length is a huge placeholder when its config does not set it)
CHUNK_TOKENS = 75


class Chunk(NamedTuple):
    """One chunk of a prompt as CLIP reads it (77 tokens), as A1111 lays it out."""

    ids: list[int]
    weights: list[float]
    #: each textual-inversion embedding in it: (the position of its first vector among the 77,
    #: its name); its placeholder tokens are 0, as A1111's
    fixes: tuple[tuple[int, str], ...] = ()


class EmbeddingNames:
    """A1111's lookup of textual-inversion embeddings in a prompt (its ``EmbeddingDatabase``).

    Each embedding's name is tokenized as a prompt is; at each token of a prompt piece, the
    longest name whose tokens follow from there is that embedding, which takes as many
    tokens as it has vectors. Names the tokenizer reads alike ("Bad", "bad") are refused:
    A1111 would pick one by the order it found the files.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        vectors: Each embedding's name and its number of vectors.

    Raises:
        ConfigError: Two names of the same tokens, or a name of none.
    """

    def __init__(self, tokenizer, vectors: dict[str, int]) -> None:
        self.counts = dict(vectors)  # each name's number of vectors
        ids = tokenizer(list(vectors), add_special_tokens=False).input_ids if vectors else []
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        seen: dict[tuple[int, ...], str] = {}
        for name, name_ids in zip(vectors, ids, strict=True):
            key = tuple(name_ids)
            if not key or key in seen:
                other = f"reads as {seen[key]!r} does" if key else "holds no token"
                raise ConfigError(
                    f"textual-inversion embedding {name!r}: its name {other} to CLIP's "
                    "tokenizer (A1111 would use one of them as it finds the files): rename one"
                )
            seen[key] = name
            self._by_first.setdefault(key[0], []).append((key, name))
        for entries in self._by_first.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    def at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """The embedding whose name starts at ``position``: (name, its length in tokens)."""
        for ids, name in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return name, len(ids)
        return None


def a1111_chunks(
    tokenizer, text: str, emphasis: str = "original", embeddings: EmbeddingNames | None = None
) -> list[Chunk]:
    """A prompt's token ids and per-token weights, in chunks, as AUTOMATIC1111 lays them out.

    A1111's ``tokenize_line``: each emphasis piece is tokenized on its own; the tokens fill
    chunks of :data:`CHUNK_TOKENS` (75); a full chunk with a comma among its last
    :data:`COMMA_BACKTRACK` tokens ends after that comma; ``BREAK`` ends a chunk. Each chunk is
    laid out as the start token, its tokens, the end token and padding to 77 tokens. A prompt
    within one chunk has the ids diffusers' and kohya's tokenizer call gives. With emphasis
    ``none`` the whole text is one piece of weight 1 (A1111 does not parse it); with
    ``ignore`` the pieces are parsed and every weight is 1 (A1111's multipliers go unused).
    A textual-inversion embedding's name (``embeddings``) becomes one placeholder token per
    vector, moved whole to the next chunk where it does not fit; the comma backtrack moves its
    placeholders but leaves its vectors' place in the chunk before, as A1111's does.
    Checked against A1111's own function in ``tests/test_parity.py`` and
    ``tests/generate/test_textual_inversion.py``.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        text: A prompt that :func:`check_prompt_syntax` accepts.
        emphasis: The emphasis mode (:data:`EMPHASIS_MODES`).
        embeddings: The run's textual-inversion embeddings (None: none).

    Returns:
        One :class:`Chunk` per chunk, each of 77; weight 1 outside the prompt's words.
    """
    pieces = [(text, 1.0)] if emphasis == "none" else parse_emphasis(text)
    tokens = tokenizer([piece for piece, _ in pieces], add_special_tokens=False).input_ids
    chunks = _Chunks(tokenizer.get_vocab().get(",</w>"))
    for piece_ids, piece in zip(tokens, pieces, strict=True):
        if piece == BREAK_MARK:
            chunks.close()
            continue
        weight = 1.0 if emphasis == "ignore" else piece[1]
        position = 0
        while position < len(piece_ids):
            found = embeddings.at(piece_ids, position) if embeddings else None
            if found is None:
                chunks.add(piece_ids[position], weight)
                position += 1
                continue
            name, length = found
            chunks.add_embedding(piece_ids[position], name, embeddings.counts[name], weight)
            position += length
    return [_laid_out(*chunk, tokenizer) for chunk in chunks.finished()]


def _laid_out(ids: list[int], weights: list[float], fixes, tokenizer) -> Chunk:
    """A chunk as CLIP reads it: start token, ids, end token, padding (A1111's SD1: the end)."""
    padding = CHUNK_TOKENS - len(ids)
    ids = [
        tokenizer.bos_token_id,
        *ids,
        tokenizer.eos_token_id,
        *[tokenizer.pad_token_id] * padding,
    ]
    weights = [1.0, *weights, *[1.0] * (1 + padding)]
    return Chunk(ids, weights, tuple((at + 1, name) for at, name in fixes))


class _Chunks:
    """A prompt's tokens filling chunks of :data:`CHUNK_TOKENS` (A1111's ``tokenize_line``)."""

    def __init__(self, comma: int | None) -> None:
        self.comma = comma
        self.done: list[tuple[list[int], list[float], list[tuple[int, str]]]] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []  # (where an embedding's placeholders start, name)
        self.last_comma = -1  # where the open chunk's last comma is, -1 for none

    def add(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, token: int, name: str, vectors: int, weight: float) -> None:
        """An embedding whose name starts with ``token``: a placeholder per vector (A1111's 0)."""
        self._make_room(token)
        if len(self.ids) + vectors > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.ids), name))
        self.ids += [0] * vectors
        self.weights += [weight] * vectors

    def _make_room(self, token: int) -> None:
        """A1111's steps before it places a token: the comma backtrack, a full chunk closed."""
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif self._full() and self.last_comma != -1 and self._since_comma() <= COMMA_BACKTRACK:
            cut = self.last_comma + 1  # the words after the comma move to the next chunk
            moved = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()  # with its fixes, also of placeholders that move (as A1111's)
            self.ids, self.weights = list(moved[0]), list(moved[1])
        if self._full():
            self.close()

    def _full(self) -> bool:
        return len(self.ids) == CHUNK_TOKENS

    def _since_comma(self) -> int:
        return len(self.ids) - self.last_comma

    def close(self) -> None:
        self.done.append((self.ids, self.weights, self.fixes))
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def finished(self) -> list[tuple[list[int], list[float], list[tuple[int, str]]]]:
        """The chunks, the open one last unless it is empty and follows others."""
        if self.ids or not self.done:
            self.close()
        return self.done
