"""Run folders: every command that produces something writes one.

A run folder holds ``config.yaml`` (the resolved config), its outputs, ``log.txt`` and a
``done.json`` written last. ``done.json`` records what finished, when, and the hashes of the
inputs, so that resuming and the experiment runner can tell finished work from partial work.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fulora.config import save_config
from fulora.io import write_json

logger = logging.getLogger("fulora")


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class RunDir:
    """A run folder: config, log and completion marker.

    Args:
        path: The folder; created if missing.
        command: The command that runs in it (recorded in ``done.json``).
    """

    def __init__(self, path: str | Path, command: str = ""):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.started = time.time()
        self._handler: logging.Handler | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done_file(self) -> Path:
        """The completion marker, written last."""
        return self.path / "done.json"

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
        path = self.path / "config.yaml"
        if not path.is_file():
            return None
        import yaml

        from fulora.config import to_dict

        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        new = to_dict(config)
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def start(self, config: Any | None = None) -> RunDir:
        """Save the resolved config, remove a stale completion marker and start logging to file."""
        if config is not None:
            save_config(config, self.path / "config.yaml")
        self.done_file.unlink(missing_ok=True)
        self._handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self._handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.info("run %s: %s", self.path, self.command or " ".join(sys.argv))
        return self

    def finish(self, **info: Any) -> dict[str, Any]:
        """Write ``done.json`` (last), stop file logging and return what was recorded."""
        from fulora import __version__

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
        """Stop logging to this run's ``log.txt``."""
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
