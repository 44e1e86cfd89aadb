"""A stage of an experiment, and how one runs: in this process, or in a Ray worker.

The runner (:mod:`fulora.experiment.runner`) plans the stages; an executor runs them: the local
one here, one after another in plan order, or :mod:`fulora.experiment.ray_executor`, as Ray tasks
in dependency order. Both start a stage the same way (:func:`begin_stage`), so a stage done by
either executor is done for both.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from fulora.experiment.layout import STAGE_MARKER
from fulora.io import atomic_open, write_json
from fulora.runs import DONE_NAME, LOG_NAME, now_iso

logger = logging.getLogger("fulora")

#: Stage kinds in execution order (``--from`` takes one of these).
STAGES = ("lora", "generate", "classify", "audit", "evaluate", "embedding", "results", "report")


@dataclass
class Stage:
    """One unit of work in an experiment."""

    kind: str
    name: str
    folder: Path
    key: str
    action: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()  # names of the stages whose outputs it reads
    shards: int = 1  # > 1: generation split into shard tasks by the Ray executor
    shard_action: Callable[[int, int], Any] | None = None  # shard (k, n) of the work

    def state(self) -> str:
        """``done`` (same key, finished), ``partial`` (same key), ``stale`` or ``new``."""
        marker = self.folder / STAGE_MARKER
        if not marker.is_file():
            return "stale" if self.folder.exists() and any(self.folder.iterdir()) else "new"
        try:
            key = json.loads(marker.read_text(encoding="utf-8")).get("key")
        except (OSError, json.JSONDecodeError):
            return "stale"
        if key != self.key:
            return "stale"
        return "done" if (self.folder / DONE_NAME).is_file() else "partial"


def rerun_readers(stages: list[Stage], states: dict[str, str]) -> dict[str, str]:
    """``states`` with every done stage that reads a stage that runs again marked ``stale``.

    A stage's key covers the keys of the stages it reads, not their outputs. A stage folder
    deleted by hand, or with an unreadable ``stage.json``, runs again under the same key, and
    on a GPU (nondeterministic kernels) writes other weights or images; a done stage that read
    the old ones would then describe outputs that are no longer there.
    """
    states, changed = dict(states), True
    while changed:  # until the readers of readers are marked too, whatever the stages' order
        changed = False
        for stage in stages:
            rerun = [name for name in stage.after if states.get(name, "done") != "done"]
            if states[stage.name] == "done" and rerun:
                states[stage.name], changed = "stale", True
                logger.info("%s: done, but it reads %s, which runs again", stage.name, rerun[0])
    return states


#: Per stage kind, whether an interrupted stage left work it resumes from.
_SAVED_WORK: dict[str, Callable[[Path], bool]] = {
    "lora": lambda folder: any((folder / "checkpoints").glob("step-*")),
    "classify": lambda folder: (folder / "last.pt").is_file(),
    # [!.]: not a killed write's .<name>.tmp.png (Path.glob's * matches a leading dot)
    "generate": lambda folder: any(folder.glob("*/[!.]*.png")),
}


def partial_word(stage: Stage) -> str:
    """How an interrupted stage goes on: from its saved work, or from the start."""
    saved = _SAVED_WORK.get(stage.kind)
    if saved is None:
        return "rerunning"
    return "resuming" if saved(stage.folder) else "restarting (no checkpoint)"


def supersede(out: Path, folder: Path) -> None:
    """Move an outdated stage folder under ``out/superseded/`` (nothing is deleted)."""
    target = (
        out
        / "superseded"
        / f"{folder.relative_to(out).as_posix().replace('/', '__')}-{int(time.time())}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    logger.info("moved the outdated %s to %s", folder, target)


def begin_stage(stage: Stage) -> None:
    """Mark the stage folder with the stage's key before any of its work lands there."""
    stage.folder.mkdir(parents=True, exist_ok=True)
    write_json(
        stage.folder / STAGE_MARKER,
        {"stage": stage.name, "key": stage.key, "started": now_iso(), **stage.info},
    )


@dataclass
class StageRun:
    """What became of one stage (or one shard of a generation stage) in this run."""

    stage: str
    kind: str
    state: Literal["ran", "skipped", "failed", "blocked"]
    node: str = ""
    seconds: float = 0.0
    log: str = ""
    error: str = ""


def node_name() -> str:
    """The name of the machine this runs on, as the summary shows it."""
    return socket.gethostname()


_SHARD = " (shard "


def shard_name(stage: str, shard: tuple[int, int] | None) -> str:
    """The name a shard ``(k, n)`` of a stage runs under: ``NAME (shard k+1/n)``."""
    return stage if shard is None else f"{stage}{_SHARD}{shard[0] + 1}/{shard[1]})"


def stage_of(run_name: str) -> tuple[str, bool]:
    """(the stage's name, whether ``run_name`` is one of its shards): :func:`shard_name` undone."""
    stage, shard, _ = run_name.partition(_SHARD)
    return stage, bool(shard)


def supersede_outdated(out: Path, stage: Stage, state: str) -> None:
    """Move a stale or forced stage's folder aside before the stage runs again."""
    if state in ("stale", "forced") and stage.folder.exists():
        supersede(out, stage.folder)


@contextmanager
def _output_to(log: Path, name: str):
    """Printed output (progress bars) and any traceback of the block appended to ``log``."""
    with open(log, "a", encoding="utf-8", buffering=1) as stream:
        with redirect_stdout(stream), redirect_stderr(stream):
            try:
                yield
            except BaseException:
                print(f"{now_iso()} {name} failed on {node_name()}:", file=stream)
                traceback.print_exc(file=stream)
                raise


def execute_stage(
    stage: Stage,
    shard: tuple[int, int] | None = None,
    threads: int | None = None,
    capture: bool = True,
) -> StageRun:
    """Run one stage (or shard ``(k, n)`` of it) here; its outcome, node and seconds.

    As a Ray task (``capture``), printed output and errors go to the stage's ``log.txt``, where
    the stage's own run folder logs through ``RunDir`` too, so a worker's terminal stays quiet
    and every stage's story is in its folder; the local executor leaves them on the terminal.
    ``threads`` sets torch's CPU threads: the thread count changes the summation order of CPU
    matrix products, so equal counts give equal numbers.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    begin_stage(stage)
    log = stage.folder / LOG_NAME
    name = shard_name(stage.name, shard)
    started = time.perf_counter()
    with _output_to(log, name) if capture else nullcontext():
        if shard is None:
            stage.action()
        else:
            assert stage.shard_action is not None
            stage.shard_action(*shard)
    seconds = round(time.perf_counter() - started, 2)
    return StageRun(name, stage.kind, "ran", node_name(), seconds, str(log))


def run_locally(plan_stages: list[Stage], out: Path, states: dict[str, str]) -> list[StageRun]:
    """Run every stage that is not done, one after another in plan order, in this process."""
    runs = []
    for i, stage in enumerate(plan_stages, 1):
        state = states[stage.name]
        prefix = f"[{i}/{len(plan_stages)}] {stage.name}"
        if state == "done":
            logger.info("%s: done (key %s), skipped", stage.name, stage.key)
            print(f"{prefix}: done, skipped")
            runs.append(StageRun(stage.name, stage.kind, "skipped"))
            continue
        supersede_outdated(out, stage, state)
        print(f"{prefix}: {partial_word(stage) if state == 'partial' else 'running'}")
        runs.append(execute_stage(stage, capture=False))
    return runs


def write_stage_runs(path: Path, runs: list[StageRun]) -> None:
    """``stages.csv``: each stage's outcome, node and seconds in this run."""
    with atomic_open(path, "w", newline="") as handle:
        pd.DataFrame([asdict(run) for run in runs], columns=list(StageRun.__annotations__)).to_csv(
            handle, index=False
        )


def node_summary(runs: list[StageRun]) -> str:
    """Which node ran what, for how long: one line per node, its longest stages first."""
    by_node: dict[str, list[StageRun]] = {}
    for run in runs:
        if run.state == "ran":
            by_node.setdefault(run.node, []).append(run)
    lines = []
    for node, done in sorted(by_node.items()):
        done.sort(key=lambda r: -r.seconds)
        longest = ", ".join(f"{r.stage} {r.seconds:.0f} s" for r in done[:3])
        more = f", +{len(done) - 3} more" if len(done) > 3 else ""
        total = sum(r.seconds for r in done)
        lines.append(f"  {node}: {len(done)} stages, {total:.0f} s of work ({longest}{more})")
    return "\n".join(lines)


def stage_seconds(runs: list[StageRun]) -> dict[str, float]:
    """Seconds per stage in this run; a sharded stage's are its longest shard's plus its own."""
    seconds: dict[str, float] = {}
    shards: dict[str, float] = {}
    for run in runs:
        name, shard = stage_of(run.stage)
        if shard:
            shards[name] = max(shards.get(name, 0.0), run.seconds)
        else:
            seconds[name] = seconds.get(name, 0.0) + run.seconds
    return {name: s + shards.get(name, 0.0) for name, s in seconds.items()}


def critical_path(stages: list[Stage], seconds: dict[str, float]) -> tuple[float, list[str]]:
    """The longest chain of stages that wait for each other: (its seconds, its stages).

    With enough GPUs an experiment takes about this long, whatever its total work.
    """
    longest: dict[str, tuple[float, list[str]]] = {}
    for stage in stages:  # the plan puts every stage after the stages it reads
        before = max(
            (longest[name] for name in stage.after if name in longest),
            default=(0.0, []),
            key=lambda chain: chain[0],
        )
        longest[stage.name] = (before[0] + seconds.get(stage.name, 0.0), [*before[1], stage.name])
    return max(longest.values(), default=(0.0, []), key=lambda chain: chain[0])


def failure_message(runs: list[StageRun]) -> str:
    """The failed stages with their log files, and what could not run because of them."""
    failed = [r for r in runs if r.state == "failed"]
    blocked = [r for r in runs if r.state == "blocked"]
    lines = [f"{len(failed)} stage(s) failed:"]
    lines += [f"  {r.stage}: {r.error} (log: {r.log})" for r in failed]
    if blocked:
        lines.append(f"{len(blocked)} stage(s) not run because they need a failed one")
    lines.append("fix the cause and run the same command again: finished stages are kept")
    return "\n".join(lines)
