"""CLI start-up: the time from `fulora ...` to its parsed arguments, each in a fresh process.

Two ways, each run in new Python processes so that nothing is imported yet:
  * every stage - the parser with every stage's flags (what each command built until session
    13: each stage's config module imports what the stage runs on);
  * its stage   - what `fulora` builds now: the named stage's flags only (none for `--help`).

Usage:
    python benchmarks/bench_cli.py [--repeats 5]

Prints the median seconds per command of each way and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

# What each process runs: build a parser, parse the arguments of one command's --help.
BUILD = (
    "import sys\nfrom fulora.cli import _stage_named, build_parser\n"
    "args = sys.argv[2:]\nonly = None if sys.argv[1] == 'every' else _stage_named(args)\n"
    "try:\n    build_parser(only=only).parse_args(args)\nexcept SystemExit:\n    pass\n"
)
COMMANDS = [
    ["--help"],
    ["report", "--help"],
    ["data", "inspect", "--help"],
    ["generate", "--help"],
    ["classify", "train", "--help"],
]


def seconds(way: str, command: list[str], repeats: int) -> float:
    """The median wall time of ``repeats`` fresh processes parsing ``command`` ``way``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", BUILD, way, *command], check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, python {platform.python_version()}")
    print("| command | every stage (s) | its stage (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for command in COMMANDS:
        every, alone = (seconds(way, command, args.repeats) for way in ("every", "alone"))
        print(
            f"| `fulora {' '.join(command)}` | {every:.2f} | {alone:.2f} | {every / alone:.1f}x |"
        )


if __name__ == "__main__":
    main()
