"""Run folders: every command that produces something writes one.

A run folder holds ``config.yaml`` (the resolved config), its outputs, ``log.txt`` and a
``done.json`` written last. ``done.json`` records what finished, when, and the hashes of the
inputs, so that resuming and the experiment runner can tell finished work from partial work.

One writer per folder: :meth:`RunDir.start` takes an exclusive lock (:class:`FolderLock`)
that a second process, or a second run in the same process, cannot take until the first
finishes or dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from fulora import __version__
from fulora.config import save_config, to_dict
from fulora.errors import FolderInUseError, NonFiniteError
from fulora.io import check_writable_folder, write_json

logger = logging.getLogger("fulora")

#: The files every run folder holds (the experiment's layout builds on them).
CONFIG_NAME = "config.yaml"  # the resolved config, written at start
DONE_NAME = "done.json"  # written last: the run finished
LOG_NAME = "log.txt"
TRAIN_MANIFEST_NAME = "train_manifest.csv"  # a training run's images, written at start


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class FolderLock:
    """An exclusive lock on a folder, held from :meth:`acquire` until :meth:`release`.

    The lock is an OS file lock (``filelock``, ``flock`` on POSIX) on ``.fulora.lock``: the OS
    drops it when the holding process dies, even by SIGKILL, so a crash never leaves the
    folder locked. Who holds it (pid, host, command, since when) is in ``.fulora.lock.json``,
    for the second writer's message; finding that file while the lock is free means the last
    holder died, and the new holder takes over with a warning.
    """

    def __init__(self, folder: str | Path):

        self.folder = Path(folder)
        self.info_file = self.folder / ".fulora.lock.json"
        self._lock = FileLock(self.folder / ".fulora.lock", timeout=0)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._lock.is_locked

    def holder(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock, from ``.fulora.lock.json``."""
        try:
            return json.loads(self.info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self, command: str) -> None:
        """Take the lock, or raise :class:`FolderInUseError` naming its holder."""
        try:
            self._lock.acquire()
        except Timeout:
            raise FolderInUseError(_in_use_message(self.folder, self.holder())) from None
        stale = self.holder()
        if stale is not None:
            logger.warning(
                "%s: taking over the lock left by pid %s on %s (%s, since %s); that process "
                "is gone",
                self.folder,
                stale.get("pid"),
                stale.get("host"),
                stale.get("command") or "?",
                stale.get("since"),
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
        write_json(self.info_file, info | {"since": now_iso()})

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self.held:
            self.info_file.unlink(missing_ok=True)
            self._lock.release(force=True)


def _in_use_message(folder: Path, holder: dict[str, Any] | None) -> str:
    who = "another fulora process"
    if holder:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} "
            f"({holder.get('command') or 'fulora'}, since {holder.get('since')})"
        )
    return (
        f"{folder} is being written by {who}. Wait for that run to finish, or give this one "
        "another --out folder."
    )


def steady_rate(mark: tuple[int, float] | None, count: int, ended: float) -> float | None:
    """Items per second from ``mark`` (count, ``time.perf_counter()``) to ``count`` at ``ended``.

    The mark is set after the warm-up (first batch, first steps: compilation, autotuning,
    allocation), so the rate says what a long run sustains; None when nothing came after it.
    """
    if mark is None or count <= mark[0]:
        return None
    return round((count - mark[0]) / (ended - mark[1]), 3)


def _field_defaults(config: Any) -> dict[str, Any]:
    """What a saved config without a key meant, per field.

    The field's plain (non-factory) default; or, for a key added with a new default, the
    behaviour before it, which the config class's ``ABSENT_MEANS`` names.
    """
    if not dataclasses.is_dataclass(config):
        return {}
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING
    }
    return defaults | getattr(type(config), "ABSENT_MEANS", {})


class RunDir:
    """A run folder: config, log and completion marker.

    Args:
        path: The folder; created if missing.
        command: The command that runs in it (recorded in ``done.json``).
    """

    def __init__(self, path: str | Path, command: str = ""):
        self.path = check_writable_folder(path)
        self.command = command
        self.started = time.time()
        self._handler: logging.Handler | None = None
        self._lock = FolderLock(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done_file(self) -> Path:
        """The completion marker, written last."""
        return self.path / DONE_NAME

    def is_done(self) -> bool:
        """Whether an earlier run in this folder finished."""
        return self.done_file.is_file()

    def read_done(self) -> dict[str, Any] | None:
        """The ``done.json`` of a finished run, or None."""
        if not self.is_done():
            return None
        return json.loads(self.done_file.read_text(encoding="utf-8"))

    def changed_config_keys(self, config: Any) -> list[str] | None:
        """Keys whose value differs from the ``config.yaml`` already here (None: no config yet).

        An empty list means the folder holds a run of exactly this configuration.
        """
        path = self.path / CONFIG_NAME
        if not path.is_file():
            return None

        return sorted(self.config_differences(config))

    def config_differences(self, config: Any) -> dict[str, tuple[Any, Any]]:
        """``{key: (value in the config.yaml here, value in config)}`` for each key that differs.

        A key the file lacks was added since: it means its default, or what the config class's
        ``ABSENT_MEANS`` says the behaviour was before. Empty without a config.yaml.
        """
        path = self.path / CONFIG_NAME
        if not path.is_file():
            return {}
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        new = to_dict(config)
        defaults = _field_defaults(config)
        return {
            k: (old.get(k, defaults.get(k)), new.get(k))
            for k in sorted(set(old) | set(new))
            if old.get(k, defaults.get(k)) != new.get(k)
        }

    def lock(self) -> RunDir:
        """Take the folder's exclusive lock (:class:`FolderLock`) until :meth:`close`.

        Raises:
            FolderInUseError: Another run holds it.
        """
        if not self._lock.held:
            self._lock.acquire(self.command or " ".join(sys.argv))
        return self

    def start(self, config: Any | None = None) -> RunDir:
        """Lock the folder, save the resolved config, drop a stale completion marker, log to file.

        Raises:
            FolderInUseError: Another run is writing this folder; nothing was written.
        """
        self.lock()
        if config is not None:
            save_config(config, self.path / CONFIG_NAME)
        self.done_file.unlink(missing_ok=True)
        self._handler = logging.FileHandler(self.path / LOG_NAME, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self._handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.info("run %s: %s", self.path, self.command or " ".join(sys.argv))
        return self

    def finish(self, **info: Any) -> dict[str, Any]:
        """Write ``done.json`` (last), stop file logging and return what was recorded."""
        record = {
            "command": self.command,
            "finished": now_iso(),
            "seconds": round(time.time() - self.started, 3),
            "fulora_version": __version__,
            "python": platform.python_version(),
            **info,
        }
        write_json(self.done_file, record)
        logger.info("finished in %.1f s", record["seconds"])
        self.close()
        return record

    def close(self) -> None:
        """Stop logging to this run's ``log.txt`` and release the folder's lock."""
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self._lock.release()


def check_finite_weights(named_tensors: Iterable[tuple[str, Any]], what: str, advice: str) -> None:
    """Refuse weights that are no longer finite, before anything saves or uses them.

    A learning rate too high, or an overflow without a mixed-precision scaler to skip its step,
    turns the weights into NaN, and every later step keeps them so: the run would go on and
    save, and everything downstream would score a model that predicts one class.

    Args:
        named_tensors: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
        what: What holds them, for the message ("the classifier after epoch 3").
        advice: What to do instead, for the message.

    Raises:
        NonFiniteError: Naming the first such tensor and how many there are.
    """
    bad = [name for name, tensor in named_tensors if not bool(tensor.isfinite().all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{what} has weights that are not finite (NaN or inf: {bad[0]}{more}): the training "
            f"diverged. {advice}"
        )
