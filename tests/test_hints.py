"""Every flag and command an error message or hint names exists (issue 13, "Also").

The strings are read from fulora's source with ``tokenize``, so a message added later that
names a flag no command has fails here.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import fulora
from fulora.cli import build_parser

SOURCE = Path(fulora.__file__).parent
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")  # not kohya_style
COMMAND = re.compile(r"`fulora ([a-z]+)(?: ([a-z][a-z-]*))?")


def _strings() -> list[tuple[str, int, str]]:
    rows = []
    for path in sorted(SOURCE.rglob("*.py")):
        with open(path, encoding="utf-8") as handle:
            tokens = tokenize.generate_tokens(io.StringIO(handle.read()).readline)
            for tok in tokens:
                if tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
                    rows.append((str(path.relative_to(SOURCE)), tok.start[0], tok.string))
    return rows


def _flags(cli_commands) -> dict[tuple[str, ...], set[str]]:
    """Every (sub)command path with the option strings it accepts."""
    return {
        path: {option for action in parser._actions for option in action.option_strings}
        for path, parser in cli_commands(build_parser()).items()
    }


def test_every_flag_named_in_a_message_exists(cli_commands):
    commands = _flags(cli_commands)
    every_flag = set().union(*commands.values())
    named = [f for _, _, text in _strings() for f in FLAG.findall(text)]
    assert len(named) > 20  # the scan sees the messages
    missing = [
        f"{path}:{line}: --{flag}"
        for path, line, text in _strings()
        for flag in FLAG.findall(text)
        if f"--{flag}" not in every_flag
    ]
    assert not missing, "messages name flags no command has:\n" + "\n".join(missing)


def test_every_command_named_in_a_message_exists(cli_commands):
    commands = _flags(cli_commands)
    missing, named = [], 0
    for path, line, text in _strings():
        for group, sub in COMMAND.findall(text):
            named += 1
            has_subcommands = any(len(k) == 2 and k[0] == group for k in commands)
            known = (group, sub) in commands if has_subcommands else (group,) in commands
            if not known:
                missing.append(f"{path}:{line}: fulora {group} {sub}")
    assert named > 10  # the scan sees the messages
    assert not missing, "messages name commands that do not exist:\n" + "\n".join(missing)
