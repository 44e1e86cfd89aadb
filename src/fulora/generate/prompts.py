"""Prompts that AUTOMATIC1111 and fulora read alike.

fulora encodes a prompt as plain text, as diffusers and kohya's training (without
``--weighted_captions``) do. AUTOMATIC1111 reads a prompt language in the same text: emphasis
``(word)``, ``(word:1.3)`` and ``[word]`` reweight the word's embeddings, ``[a:b:10]`` switches
prompts during sampling, ``[a|b]`` alternates them, ``AND`` composes prompts, ``BREAK`` starts a
new 75-token chunk, ``<lora:name:0.8>`` loads a network, and a backslash escapes a bracket. Each
PNG carries its prompt in A1111's settings text, so such a prompt would make one image in fulora
and another in A1111 from the same settings; fulora refuses it instead (kept out of the plain
text: a prompt that only looks alike, "fetal brain, 2D", passes).

A prompt over CLIP's 75 tokens is the other difference: A1111 encodes it in chunks of 75,
fulora's encoder keeps the first 75 (:func:`check_prompt_length`).
"""

from __future__ import annotations

import re

from fulora.errors import ConfigError

_A1111_SYNTAX = re.compile(r"[()\[\]\\|]|<\w+:|\bAND\b|\bBREAK\b")


def check_plain_prompt(text: str, what: str) -> None:
    """Refuse a prompt that AUTOMATIC1111 would read as its prompt language.

    Args:
        text: The prompt.
        what: Which prompt, for the message ("the prompt of brain", "negative_prompt").

    Raises:
        ConfigError: Naming the piece of syntax and what to do.
    """
    found = _A1111_SYNTAX.search(text)
    if found is None:
        return
    raise ConfigError(
        f"{what} {text!r} holds {found.group()!r} (at character {found.start() + 1}), which "
        "AUTOMATIC1111 reads as its prompt syntax (emphasis '(word:1.2)' and '[word]', prompt "
        "switching '[a:b:10]' and '[a|b]', 'AND', 'BREAK', '<lora:name:w>') and fulora as plain "
        "text, so the two would make different images from the same settings: write it "
        "without (a LoRA goes in lora and lora_scale, --lora and --lora-scale)"
    )


def check_prompt_length(tokenizer, text: str, what: str) -> None:
    """Refuse a prompt longer than the tokenizer's window (75 tokens for CLIP).

    Raises:
        ConfigError: With the prompt's length in tokens.
    """
    window = tokenizer.model_max_length - 2  # the start and end tokens
    tokens = len(tokenizer(text, truncation=False).input_ids) - 2
    if tokens > window:
        raise ConfigError(
            f"{what} {text!r} is {tokens} tokens, over CLIP's {window}: AUTOMATIC1111 encodes a "
            f"longer prompt in chunks of {window} and fulora would keep the first {window} "
            "only, so the two would make different images: shorten it"
        )
