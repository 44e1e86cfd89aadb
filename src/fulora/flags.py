"""Command-line flags generated from a config dataclass: one flag per setting.

A setting is written once, as a field of its stage's config class; its flag (``--batch-size``
for ``batch_size``), type, choices (from a ``Literal``) and help (the comment beside or above
the field, plus its default) follow from it. Flags left unset leave the YAML file and the
defaults in charge; ``--set KEY=VALUE`` still reaches nested keys.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fulora.config import _convert
from fulora.errors import ConfigError


def field_comments(cls: type) -> dict[str, str]:
    """The comment on each field's line of a dataclass's source, else the comment lines above."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        by_line: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                by_line[token.start[0]] = token.string.lstrip("#").strip()
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = by_line.get(node.lineno, "")
                above = node.lineno - 1
                block = []
                while not text and above >= 1 and lines[above - 1].strip().startswith("#"):
                    block.insert(0, by_line.get(above, ""))
                    above -= 1
                comments[node.target.id] = text or " ".join(block)
    return comments


def _flag_type(tp: Any) -> tuple[dict[str, Any], bool] | None:
    """Argparse keywords for a field type, and whether it takes several values (None: no flag)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else None
    if get_origin(tp) is Literal:
        return {"choices": [str(a) for a in get_args(tp)]}, False
    if get_origin(tp) is list and get_args(tp) and get_args(tp)[0] in (str, int, float):
        return {"type": get_args(tp)[0]}, True
    if tp is bool:
        return {"type": _parse_bool, "metavar": "true|false"}, False
    if tp in (int, float, str):
        return {"type": tp}, False
    if tp is Path:
        return {"type": str}, False
    return None  # mappings and nested configs: --set KEY=VALUE


def _parse_bool(text: str) -> bool:
    try:
        return _convert(text, bool, "flag", "")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    names: dict[str, str] | None = None,
    helps: dict[str, str] | None = None,
) -> list[str]:
    """Add one flag per setting of config class ``cls``; return the fields that got one.

    Args:
        parser: The (sub)command's parser.
        cls: A config dataclass.
        skip: Fields without a flag (the command sets them another way).
        names: Flag spellings other than the field name with dashes (e.g. ``{"n_bootstrap":
            "--bootstrap"}``).
        helps: Help texts that replace the field's comment.
    """
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for field in dataclasses.fields(cls):
        kind = _flag_type(hints[field.name])
        if field.name in set(skip) or kind is None:
            continue
        keywords, several = kind
        flag = (names or {}).get(field.name, "--" + field.name.replace("_", "-"))
        text = (helps or {}).get(field.name) or comments.get(field.name, "")
        default = field.default if field.default is not dataclasses.MISSING else None
        if default not in (None, "", dataclasses.MISSING):
            text = f"{text} (default {default})" if text else f"default {default}"
        parser.add_argument(
            flag,
            dest=field.name,
            nargs="+" if several else None,
            help=text.replace("%", "%%") or None,
            **keywords,
        )
        added.append(field.name)
    return added


def config_values(args: argparse.Namespace, fields: Iterable[str]) -> dict[str, Any]:
    """The settings given as flags (None: not given), for :func:`fulora.config.load_config`."""
    return {name: getattr(args, name, None) for name in fields}
