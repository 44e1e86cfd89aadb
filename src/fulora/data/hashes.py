"""Content hashes of image files, remembered across runs while a file's mtime and size hold.

A stage's fingerprint covers the bytes of every image it reads (an image replaced in place
changes it), and re-hashing an unchanged 12,000-image dataset on every ``experiment run``
would cost seconds to minutes; so the hashes live in a small SQLite index in the cache folder,
keyed by (absolute path, mtime_ns, size). A file whose mtime or size changed is hashed again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from fulora.data.cache import content_hash, default_cache_dir

logger = logging.getLogger("fulora")

MISSING = "missing"  # the hash of a file that does not exist (the stage fails later, by name)


def default_index() -> Path:
    """``content-hashes.sqlite`` in fulora's cache folder (:func:`default_cache_dir`)."""
    return default_cache_dir() / "content-hashes.sqlite"


def _open(index: Path) -> sqlite3.Connection:
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(index, timeout=30)
        db.execute(_TABLE)
    except (OSError, sqlite3.Error) as err:  # a read-only home: hash without remembering
        logger.debug("content-hash index %s unusable (%s); hashing in memory", index, err)
        db = sqlite3.connect(":memory:")
        db.execute(_TABLE)
    return db


_TABLE = (
    "CREATE TABLE IF NOT EXISTS hashes "
    "(path TEXT PRIMARY KEY, mtime_ns INTEGER, size INTEGER, hash TEXT)"
)


def content_hashes(paths: Iterable[str | Path], index: str | Path | None = None) -> list[str]:
    """The content hash of each file, from the index where the file is unchanged.

    Args:
        paths: Files (a missing one hashes to ``"missing"``).
        index: The SQLite index (default :func:`default_index`).
    """
    db = _open(Path(index) if index is not None else default_index())
    with db:
        out, fresh = [], []
        for path in paths:
            key = os.path.abspath(path)
            try:
                stat = os.stat(key)
            except OSError:
                out.append(MISSING)
                continue
            row = db.execute(
                "SELECT hash FROM hashes WHERE path = ? AND mtime_ns = ? AND size = ?",
                (key, stat.st_mtime_ns, stat.st_size),
            ).fetchone()
            if row is None:
                row = (content_hash(key),)
                fresh.append((key, stat.st_mtime_ns, stat.st_size, row[0]))
            out.append(row[0])
        db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", fresh)
    db.close()
    return out
