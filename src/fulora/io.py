"""Small file helpers: atomic writes and content hashes.

Everything fulora writes goes to a temporary name in the destination folder and is renamed into
place, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fulora.errors import ConfigError, WriteError

logger = logging.getLogger("fulora")

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; final files get the usual permissions.
_FILE_MODE = 0o666 & ~_umask()


def _reason(err: BaseException, folder: Path) -> str | None:
    """Why a write failed, in words, or None for errors that are not the file system's."""
    if isinstance(err, OSError) and err.errno in _REASONS:
        return f"{_REASONS[err.errno]} ({errno.errorcode[err.errno]})"
    if isinstance(err, RuntimeError) and "inline_container" in str(err):  # torch.save's writer
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return "the disk is full (torch.save could not finish the file)"
        return f"torch.save could not finish the file ({str(err).splitlines()[0]})"
    return None


@contextlib.contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk, a read-only file system or a refused permission into a WriteError.

    The message (also logged, so it reaches the run's ``log.txt``) names the file and says that
    what was there before is intact: every write goes to a temporary file first.
    """
    path = Path(path)
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as err:
        reason = _reason(err, path.parent)
        if reason is None:
            raise
        kept = f"the previous {path.name} is" if path.is_file() else "earlier files are"
        message = (
            f"could not write {path}: {reason}. Nothing was lost: {kept} as it was, with "
            "earlier checkpoints (fulora writes to a temporary file and renames it). Free "
            "space or fix the folder, then run the same command again to resume."
        )
        logger.error(message)
        raise WriteError(message) from err


def check_writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any work.

    Raises:
        ConfigError: If ``folder`` is an existing file.
        WriteError: If it cannot be created or written (read-only, no permission, disk full).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; give --out a folder path")
    with write_errors(folder / ".fulora-write-test"):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fulora-write-test.", dir=folder)
        try:
            os.write(fd, b"fulora")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    return folder


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and rename it onto ``path`` when the block succeeds.

    Args:
        path: Final destination.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **kwargs: Passed to :func:`open` (e.g. ``encoding``, ``newline``).

    Yields:
        The open temporary file. If the block raises, the temporary file is removed and ``path``
        is left as it was.
    """
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        try:
            if "b" not in mode:
                kwargs.setdefault("encoding", "utf-8")
            with open(tmp, mode, **kwargs) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name (PIL, torch).

    The temporary file keeps ``path``'s suffix so that libraries choosing a format by extension
    still work. It is renamed onto ``path`` when the block succeeds and removed otherwise.
    """
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
        os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def half_written(folder: str | Path, suffix: str) -> list[Path]:
    """The temporary files of ``*<suffix>`` writes that :func:`atomic_path` left in ``folder``.

    Only a writer killed mid-write leaves one; a finished or failed write removes its own.
    """
    return sorted(Path(folder).glob(f".*.tmp{suffix}"))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", newline="") as handle:
        handle.write(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_hash(
    path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20, start: int = 0
) -> str:
    """Hex digest of a file's content, read in chunks.

    Args:
        path: The file.
        algorithm: Any :mod:`hashlib` algorithm name (``sha256``, ``md5``, ``blake2b``).
        chunk: Read size in bytes.
        start: The byte to start at (the bytes before it are left out of the digest).
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        handle.seek(start)
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
